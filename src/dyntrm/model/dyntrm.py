"""DynTRMBlock and ArcTransformer (DESIGN §3.1, §3.6): one re-entrant block, applied up to N times.

::

    x = embed(tokens)                                         # (B, T, D)
    for step in range(N):                                     # the same block, the same global libraries
        x = x + DynSIHA(norm(x); attn_library)                # Q, K, V composed per token and head
        x = x + DynMoE(norm(x); ffn_library)                  # sparse ReLU-gated experts
        logits[step] = lm_head(norm(x))                       # deep supervision: every step predicts
        q_halt, q_continue = halt_head(x[prompt_end])         # ACT, read at the last prompt position
        (inference) samples with sigmoid(q_halt - q_continue) > threshold stop here

Training unrolls all N steps for every sample (full BPTT). Inference (``halt=True``, :meth:`prefill`) drops each
sample from the batch at its halting step, so halted samples cost nothing more; the step count chosen at the
prompt's end is reused for every generated token through one KV cache per step.

``variant="dense"`` swaps DynSIHA for linear Q/K/V and DynMoE for one FFN of the same active width: same code
path, same recursion and ACT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..data.arc import MAX_SIDE
from .attention import AttnMask, DenseAttention, DynSIHA, KVCache
from .experts import ExpertLibrary
from .layers import GridCursor, RMSNorm, Rope, grid_coords
from .moe import DenseFFN, DynMoE

Tap = Callable[..., None]  # tap(step, module, **tensors): observes routing (SARS capture, statistics, pictures)


@dataclass
class StepContext:
    """What one block application needs besides x."""

    step: int
    cos: torch.Tensor
    sin: torch.Tensor
    attn: AttnMask
    valid: torch.Tensor | None = None  # (B, T) real tokens, None when there is no padding
    cache: KVCache | None = None
    decode_pos: torch.Tensor | None = None  # (B,) position of the single new token, when decoding
    tap: Tap | None = None

    @property
    def valid_flat(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid.reshape(-1)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (S, B, T, V): every step's prediction; a halted sample repeats its last step
    q_halt: torch.Tensor  # (S, B)
    q_continue: torch.Tensor  # (S, B)
    steps: torch.Tensor  # (B,) recursion steps each sample ran
    moe_l1: torch.Tensor  # mean over steps and real tokens of Σ_e w_e (the sparsity penalty; 0 for dense)
    moe_active: torch.Tensor  # mean active FFN experts per real token and step (no gradient)
    caches: list[tuple[torch.Tensor, KVCache]] | None = None  # per step: (rows that ran it, their KV cache)
    grad_from: int = 0  # steps before this one ran without gradient (``detach_steps``): the loss skips them

    @property
    def final_logits(self) -> torch.Tensor:
        return self.logits[-1]


@dataclass
class DecodeState:
    """KV-cached generation state: step s ran for the batch rows ``rows[s]`` and cached their keys/values."""

    rows: list[torch.Tensor]
    caches: list[KVCache]
    pos: torch.Tensor  # (B,) position the next token takes
    steps: torch.Tensor  # (B,) steps per sample, fixed at prefill
    q_halt: torch.Tensor  # (S, B) halting logits seen at prefill
    q_continue: torch.Tensor
    cursor: GridCursor | None = None  # each sample's place in its grid (model.grid_coords)

    def keep(self, idx: torch.Tensor) -> "DecodeState":
        """Only the batch rows ``idx`` go on, renumbered in that order: used to drop finished sequences from a
        decoding batch so that they stop costing compute. The caches shrink *in place*: the old state is spent."""
        B = self.pos.shape[0]
        new_index = torch.full((B,), -1, dtype=torch.long, device=idx.device)
        new_index[idx] = torch.arange(idx.numel(), device=idx.device)
        rows, caches = [], []
        for r, c in zip(self.rows, self.caches):
            sel = torch.nonzero(new_index[r] >= 0, as_tuple=True)[0]
            c.k, c.v = c.k[sel], c.v[sel]
            rows.append(new_index[r[sel]])
            caches.append(c)
        if self.cursor is not None:
            self.cursor.keep(idx)
        return DecodeState(rows, caches, self.pos[idx], self.steps[idx], self.q_halt[:, idx], self.q_continue[:, idx],
                           self.cursor)


class DynTRMBlock(nn.Module):
    """Pre-norm attention + FFN with residuals, and the halt head. Holds routers, not experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2 = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        if cfg.variant == "dyn":
            self.attn = DynSIHA(d, cfg.n_heads, cfg.attn_experts, cfg.attn_shared)
            self.ffn = DynMoE(d, cfg.ffn_experts, cfg.ffn_active)
        else:
            self.attn = DenseAttention(d, cfg.n_heads)
            self.ffn = DenseFFN(d, round(cfg.ffn_active * cfg.ffn_mult * d))
        self.halt_norm = RMSNorm(d, cfg.norm_eps)
        self.halt = nn.Linear(d, 2)  # (q_halt, q_continue)

    def forward(self, x: torch.Tensor, attn_lib: ExpertLibrary | None, ffn_lib: ExpertLibrary | None,
                ctx: StepContext):
        x = x + self.attn(self.norm1(x), attn_lib, ctx)
        y, stats = self.ffn(self.norm2(x), ffn_lib, ctx)
        return x + y, stats

    def halt_logits(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.halt(self.halt_norm(x_BD)).float()
        return q[:, 0], q[:, 1]


class ArcTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.d_head
        self.embed = nn.Embedding(cfg.vocab_size, d)
        if cfg.grid_coords:  # index 0: outside any grid; rows 1..30, columns 1..31 (a row separator's is w + 1)
            self.row_embed, self.col_embed = nn.Embedding(MAX_SIDE + 1, d), nn.Embedding(MAX_SIDE + 2, d)
        else:
            self.row_embed = self.col_embed = None
        if cfg.variant == "dyn":
            self.attn_expert_library = ExpertLibrary(cfg.attn_experts, dh, cfg.attn_hidden_, dh)
            self.ffn_expert_library = ExpertLibrary(cfg.ffn_experts, d, cfg.ffn_mult * d, d)
        else:
            self.attn_expert_library = self.ffn_expert_library = None
        self.block = DynTRMBlock(cfg)
        self.step_embed = nn.Parameter(torch.zeros(cfg.max_steps, d)) if cfg.step_embedding else None
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.rope = Rope(dh, cfg.rope_base, cfg.max_positions)
        self.init_weights()

    @property
    def variant(self) -> str:
        return self.cfg.variant

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every tensor's initialisation, in one place."""
        cfg = self.cfg
        # Branch outputs shrink with the number of residual additions (2 per step), as in GPT-2 / nanochat.
        out_std = 1.0 / math.sqrt(cfg.d_model * 2 * cfg.max_steps)
        nn.init.normal_(self.embed.weight, std=1.0)
        if self.row_embed is not None:  # smaller than the token's: what a cell is stays the larger signal
            nn.init.normal_(self.row_embed.weight, std=0.5)
            nn.init.normal_(self.col_embed.weight, std=0.5)
        nn.init.normal_(self.lm_head.weight, std=0.02)  # start near the uniform distribution
        for norm in (self.block.norm1, self.block.norm2, self.block.halt_norm, self.norm):
            nn.init.ones_(norm.weight)
        if self.attn_expert_library is not None:
            # Q = Σ_e w_e·out_e sums ~E/2 active experts with E[w²] = 1/2 each: w2 ~ N(0, (2/E)·(2/F)) (F the
            # expert's hidden width; silu halves the variance of its unit-variance input) starts Q, K, V near unit RMS.
            n = cfg.attn_experts
            self.attn_expert_library.init_weights(out_std=math.sqrt(2.0 / n) * math.sqrt(2.0 / cfg.attn_hidden_))
            self.ffn_expert_library.init_weights(out_std=out_std * math.sqrt(cfg.d_model / (cfg.ffn_mult * cfg.d_model))
                                                 / math.sqrt(max(cfg.ffn_active, 1.0)))
            self.block.attn.init_weights(out_std)
            self.block.ffn.init_weights()
        else:
            self.block.attn.init_weights(out_std)
            self.block.ffn.init_weights(out_std * math.sqrt(cfg.d_model / self.block.ffn.mlp.w1.out_features))
        # The halt head starts undecided toward "continue": sigmoid(q_halt - q_continue) = sigmoid(-2).
        nn.init.zeros_(self.block.halt.weight)
        self.block.halt.bias.copy_(torch.tensor([-2.0, 0.0]))
        if self.step_embed is not None:
            nn.init.normal_(self.step_embed, std=0.02)

    # ------------------------------------------------------------------------------------------ helpers

    def should_halt(self, q_halt: torch.Tensor, q_continue: torch.Tensor, step: int) -> torch.Tensor:
        """The inference halting rule (DESIGN §3.6); the last step always halts."""
        if step + 1 >= self.cfg.max_steps:
            return torch.ones_like(q_halt, dtype=torch.bool)
        return torch.sigmoid(q_halt - q_continue) > self.cfg.halt_threshold

    def embed_tokens(self, tokens: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """Token embeddings (B, T, D), plus the grid-coordinate embeddings under ``model.grid_coords``
        (``coords``: given while decoding, else read from ``tokens``)."""
        x = self.embed(tokens)
        if self.row_embed is not None:
            row, col = coords if coords is not None else grid_coords(tokens)
            # clamped: a token stream that is not a valid task (tests feed random ones) may count past 30
            x = x + self.row_embed(row.clamp(max=MAX_SIDE)) + self.col_embed(col.clamp(max=MAX_SIDE + 1))
        return x

    def _step_input(self, x: torch.Tensor, x0: torch.Tensor, step: int) -> torch.Tensor:
        if self.cfg.input_injection and step > 0:
            x = x + x0
        if self.step_embed is not None:
            x = x + self.step_embed[step]
        return x

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None) -> tuple[AttnMask, torch.Tensor | None]:
        """Right-padded batches need only the causal mask; anything else gets an explicit one."""
        if attention_mask is None:
            return AttnMask(True), None
        valid = attention_mask.bool()
        if bool(valid.all()):
            return AttnMask(True), None
        if bool((valid[:, 1:] <= valid[:, :-1]).all()):  # every row a prefix: right padding
            return AttnMask(True), valid
        T = valid.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
        # Padding queries attend to themselves, so no row of the mask is empty (no NaN); their outputs are unused.
        m = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
        return AttnMask(False, m[:, None]), valid

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_end: torch.Tensor | None = None, *, halt: bool = False, tap: Tap | None = None,
                steps: torch.Tensor | None = None, cache_capacity: int | None = None,
                detach_steps: int = 0) -> ModelOutput:
        """Run the recursion over (B, T) ``tokens``.

        ``halt=False`` (training) runs all N steps for every sample. ``halt=True`` stops each sample at its
        halting step; ``steps`` (B,) forces given step counts instead. The halt head reads ``prompt_end`` (B,)
        (default: the last real token). With ``cache_capacity`` every step keeps a KV cache of that many positions
        for the rows that ran it (used by :meth:`prefill`). The first ``detach_steps`` steps run without gradient
        (``train.grad_steps``: backpropagation through the last steps only, as TRM trains; no tap sees them).
        """
        B, T = tokens.shape
        attn, valid = self._mask(attention_mask)
        if prompt_end is None:  # the last real position of every row (right or left padding)
            prompt_end = (T - 1 - attention_mask.flip(1).long().argmax(1) if attention_mask is not None
                          else torch.full((B,), T - 1, device=tokens.device))
        if attn.mask is None:
            cos, sin = self.rope.prefix(T)
        else:  # e.g. left padding: number real tokens from 0 in every row, so outputs match the unpadded ones
            cos, sin = self.rope.at((valid.long().cumsum(1) - 1).clamp(min=0))
        caches = [] if cache_capacity is not None else None
        x0 = self.embed_tokens(tokens)
        x = x0
        N = self.cfg.max_steps
        active = None  # None: every row runs (training fast path); else the rows still recursing
        ran = torch.zeros(B, dtype=torch.long, device=tokens.device)
        logits, q_h, q_c = [], [], []
        l1 = act = tokens.new_zeros((), dtype=torch.float32)
        n_real = (valid.sum() if valid is not None else torch.tensor(B * T, device=tokens.device)).clamp(min=1)
        for s in range(N):
            if s < detach_steps:  # the recursion's early steps: no graph, no tap (TRM's gradient truncation)
                with torch.no_grad():
                    x = self._run_step(x, x0, s, cos, sin, attn, valid, None)
                    logits.append(self.lm_head(self.norm(x)))
                    qh, qc = self.block.halt_logits(x[torch.arange(B, device=x.device), prompt_end])
                    q_h.append(qh)
                    q_c.append(qc)
                ran += 1
                continue
            rows = active if active is not None else slice(None)
            xa = self._step_input(x[rows], x0[rows], s)
            va = None if valid is None else valid[rows]
            am = attn if attn.mask is None else AttnMask(False, attn.mask[rows])
            cache = None
            if caches is not None:
                cache = KVCache(xa.shape[0], self.cfg.n_heads, cache_capacity, self.cfg.d_head, xa.device, xa.dtype)
                caches.append((torch.arange(B, device=x.device) if active is None else active, cache))
            ca, sa = (cos, sin) if cos.dim() == 2 else (cos[rows], sin[rows])
            ctx = StepContext(s, ca, sa, am, va, cache, None, tap)
            xa, stats = self.block(xa, self.attn_expert_library, self.ffn_expert_library, ctx)
            l1, act = l1 + stats.l1, act + stats.active
            pe = prompt_end[rows]
            qh, qc = self.block.halt_logits(xa[torch.arange(xa.shape[0], device=xa.device), pe])
            la = self.lm_head(self.norm(xa))
            if active is None:
                x, step_logits = xa, la
                qh_full, qc_full = qh, qc
            else:
                x = x.index_copy(0, active, xa)
                step_logits = logits[-1].index_copy(0, active, la)
                qh_full, qc_full = q_h[-1].index_copy(0, active, qh), q_c[-1].index_copy(0, active, qc)
            logits.append(step_logits)
            q_h.append(qh_full)
            q_c.append(qc_full)
            ran[rows] += 1
            if not halt:
                continue
            idx = torch.arange(B, device=x.device) if active is None else active
            stop = (ran[idx] >= steps[idx]) if steps is not None else self.should_halt(qh, qc, s)
            if bool(stop.all()):
                break
            active = idx[~stop]
        n_steps = len(logits) - detach_steps
        return ModelOutput(torch.stack(logits), torch.stack(q_h), torch.stack(q_c), ran,
                           l1 / (n_real * n_steps), (act / (n_real * n_steps)).detach(), caches, detach_steps)

    def _run_step(self, x, x0, s, cos, sin, attn, valid, tap) -> torch.Tensor:
        """One block application to every row (the no-gradient steps of :meth:`forward`)."""
        ctx = StepContext(s, cos, sin, attn, valid, None, None, tap)
        x, _ = self.block(self._step_input(x, x0, s), self.attn_expert_library, self.ffn_expert_library, ctx)
        return x

    # ------------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, prompt_len: torch.Tensor, max_new: int, *,
                steps: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Run right-padded prompts (B, T) of lengths ``prompt_len``; decide each sample's steps (ACT, or the
        given ``steps``), keep one KV cache per step with room for ``max_new`` tokens. Returns the logits
        (B, V) of each prompt's last position (the first answer token) and the decoding state."""
        B, T = tokens.shape
        mask = torch.arange(T, device=tokens.device)[None, :] < prompt_len[:, None]
        out = self.forward(tokens, mask, prompt_len - 1, halt=True, steps=steps, cache_capacity=T + max_new)
        caches = out.caches
        last = out.final_logits[torch.arange(B, device=tokens.device), prompt_len - 1]
        cursor = GridCursor(tokens, prompt_len) if self.row_embed is not None else None
        state = DecodeState([r for r, _ in caches], [c for _, c in caches], prompt_len.clone(), out.steps,
                            out.q_halt, out.q_continue, cursor)
        return last, state

    @torch.no_grad()
    def decode(self, token: torch.Tensor, state: DecodeState, tap: Tap | None = None) -> torch.Tensor:
        """Feed one token per sample (B,) at its own position; returns next-token logits (B, V)."""
        coords = None if state.cursor is None else tuple(c[:, None] for c in state.cursor.step(token))
        x0 = self.embed_tokens(token[:, None], coords)  # (B, 1, D)
        x = x0
        pos = state.pos
        length = int(pos.max()) + 1  # one host sync per token: attention then reads only the keys in use
        if length > state.caches[0].k.shape[2]:
            raise ValueError("decode ran past the KV cache capacity chosen at prefill (max_new)")
        keys = torch.arange(length, device=pos.device)
        for s, (rows, cache) in enumerate(zip(state.rows, state.caches)):
            if rows.numel() == 0:  # every sample that needed this step has left the batch
                break
            p = pos[rows]
            cos, sin = self.rope.at(p[:, None])
            mask = AttnMask(False, (keys[None, :] <= p[:, None])[:, None, None, :])
            ctx = StepContext(s, cos, sin, mask, None, cache, p, tap)
            xa = self._step_input(x[rows], x0[rows], s)
            xa, _ = self.block(xa, self.attn_expert_library, self.ffn_expert_library, ctx)
            x = x.index_copy(0, rows, xa)
        state.pos = pos + 1
        return self.lm_head(self.norm(x[:, 0]))

