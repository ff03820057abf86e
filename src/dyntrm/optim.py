"""The optimizer's pieces shared by training and test-time training: AdamW parameter groups and the learning-rate
schedule. No training loop here (train.py), so ttt.py can use them without importing the trainer."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .config import Config


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Computation (decayed matrices; undecayed norms, biases, embeddings) and routing (prototypes, gates)."""
    decay, no_decay, routing = [], [], []
    for name, p in model.named_parameters():
        if name.endswith(".proto") or name.endswith(".gate"):
            routing.append(p)
        elif p.dim() >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    t = cfg.train
    groups = [
        {"name": "computation", "params": decay, "weight_decay": t.weight_decay, "lr_mult": 1.0},
        {"name": "computation_no_decay", "params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"name": "routing", "params": routing, "weight_decay": 0.0, "lr_mult": t.routing_lr_mult},
    ]
    return [g for g in groups if g["params"]]


def run_progress(cfg: Config, step: int, elapsed: float) -> float:
    """How far the run is, in [0, 1]: by steps, or by time under ``train.time_budget_s``."""
    t = cfg.train
    progress = elapsed / t.time_budget_s if t.time_budget_s > 0 else step / t.steps
    return min(max(progress, 0.0), 1.0)


def lr_factor(cfg: Config, step: int, elapsed: float) -> float:
    """Linear warm-up times cosine decay to ``min_lr_ratio``; progress by steps, or by time under a budget."""
    t = cfg.train
    progress = run_progress(cfg, step, elapsed)
    cosine = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min(1.0, (step + 1) / max(t.warmup, 1)) * cosine
