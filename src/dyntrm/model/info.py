"""Parameter and FLOP accounting for a model config (``dyntrm info``), derived from the shapes alone.

FLOPs count multiply-adds as 2, forward only, per token and per recursion step. Attention scores depend on the
context, so they are given for a stated context length (a causal token attends to (ctx+1)/2 keys on average).
Tests check the parameter counts against an instantiated model.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..data.arc import MAX_SIDE
from .layers import DIHEDRAL_ROWS, N_COORDS


def model_info(cfg: ModelConfig, context: int = 1024) -> dict[str, float]:
    d, H, dh, V, N = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.vocab_size, cfg.max_steps
    keys = (context + 1) / 2
    n_coords = N_COORDS[cfg.grid_coords]
    common = {
        "embedding": V * d,
        "lm_head": V * d,
        "norms": 4 * d + (2 * dh if cfg.qk_norm else 0),  # norm1, norm2, halt norm, final norm (+ q, k norms)
        "halt_head": 2 * d + 2,
        "step_embedding": N * d if cfg.step_embedding else 0,
        # separate: a table per coordinate; shared: one table and a d x d map per coordinate
        "grid_coords": n_coords * (MAX_SIDE + 2) * d if cfg.coord_tables == "separate"
        else ((MAX_SIDE + 2) * d + n_coords * d * d) * (n_coords > 0),
        "dihedral_cells": DIHEDRAL_ROWS * d if cfg.dihedral_cells else 0,  # per symmetry 11 + 11 + 3 rows
    }
    flops = {
        "attention_scores": 2 * 2 * keys * d,  # q.k and p.v
        "attention_out": 2 * d * d,
        "lm_head": 2 * d * V,  # every step predicts (deep supervision)
    }
    params, inactive_ffn = dict(common), 0
    params["attn_out"] = d * d
    if cfg.dyn_attn:
        E, F = cfg.attn_experts, cfg.attn_expert_hidden
        # experts run per (token, head): all E under dense composition; under a sparse one the target per channel
        # (a lower bound: an expert active in any of q, k, v runs once for all three)
        Ea = cfg.attn_active if cfg.attn_sparse else E
        params |= {
            "attn_library": E * 2 * dh * F,
            "attn_routing": 3 * E * (dh + 1),
            "attn_shared": 3 * d * d if cfg.attn_shared else 0,  # model.attn_shared: one linear Q/K/V expert
        }
        flops |= {
            "attn_routing": H * 3 * 2 * dh * E,
            "attn_library": H * Ea * 2 * 2 * dh * F,
            "attn_composition": H * 3 * 2 * Ea * dh,
            "attn_shared": 2 * 3 * d * d if cfg.attn_shared else 0,
        }
    else:
        params["attn_qkv"] = 3 * d * d
        flops["attn_qkv"] = 2 * 3 * d * d
    if cfg.dyn_ffn:
        Ef, Ff = cfg.ffn_experts, cfg.ffn_mult * d
        params |= {
            "ffn_library": Ef * 2 * d * Ff,
            "ffn_routing": Ef * (d + 1),
            "ffn_shared": 2 * d * Ff if cfg.ffn_shared else 0,  # model.ffn_shared: one always-active FFN expert
        }
        flops |= {
            "ffn_routing": 2 * d * Ef,
            "ffn_experts": cfg.ffn_active * 2 * 2 * d * Ff,  # only the active experts run
            "ffn_shared": 2 * 2 * d * Ff if cfg.ffn_shared else 0,
        }
        inactive_ffn = (Ef - cfg.ffn_active) * 2 * d * Ff
    else:
        hidden = round(cfg.ffn_active * cfg.ffn_mult * d)
        params["ffn"] = 2 * d * hidden
        flops["ffn"] = 2 * 2 * d * hidden
    total = sum(params.values())
    return {
        "params_total": total,
        **{f"params_{k}": v for k, v in params.items()},
        "params_active_per_token": total - inactive_ffn,
        "flops_per_token_step": sum(flops.values()),
        **{f"flops_{k}": v for k, v in flops.items()},
        "context": context,
    }
