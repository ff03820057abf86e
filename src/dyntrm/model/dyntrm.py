"""DynTRMBlock and ArcTransformer (DESIGN §3.1, §3.6): one re-entrant block, applied N times.

::

    x0 = embed(tokens)                                        # (B, T, D)
    x = x0
    for s in range(N):                                        # the same block, the same global libraries
        x = step(x, x0, s):                                   # one block application
            x = x + DynSIHA(norm(x); attn_library)            #   Q, K, V composed per token and head
            x = x + DynMoE(norm(x); ffn_library)              #   sparse ReLU-gated experts
        logits[s] = lm_head(norm(x))                          # deep supervision: every step predicts
        q_halt[s], q_continue[s] = halt_head(x[prompt_end])   # ACT, read at the last prompt position

:meth:`ArcTransformer.forward` is this loop as training runs it: all N steps for every sample (full BPTT).
Inference (``halt=True``, :meth:`~ArcTransformer.prefill`, :meth:`~ArcTransformer.decode`) lives in
``model/generate.py``: there each sample leaves the batch once :func:`should_halt` fires, so halted samples cost
nothing more, and the step count chosen at the prompt's end is reused for every generated token through one KV
cache per step. Shapes: ``B`` batch, ``T`` time, ``D`` width, ``S`` steps, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig
from ..data.arc import MAX_SIDE
from . import generate
from .attention import DenseAttention, DynSIHA
from .context import AttnMask, ModelOutput, StepContext, Tap
from .experts import ExpertLibrary
from .layers import (DIHEDRAL, DIHEDRAL_ROWS, MAX_PAIR, N_COORDS, N_SOURCE_VALUES, N_SOURCES, RMSNorm, Rope,
                     dihedral_sources, grid_coords, pair_ids)
from .moe import DenseFFN, DynMoE, MoEStats


def should_halt(q_halt: torch.Tensor, q_continue: torch.Tensor, step: int | torch.Tensor,
                cfg: ModelConfig) -> torch.Tensor:
    """The inference halting rule (DESIGN §3.6): a sample stops after step ``step`` (0-based) once
    ``sigmoid(q_halt - q_continue) > halt_threshold``, and after the last step always. ``step`` is an int, or a
    tensor broadcastable against the logits (every step at once: ``arange(S)[:, None]`` for (S, B) logits)."""
    return (torch.sigmoid(q_halt - q_continue) > cfg.halt_threshold) | (step + 1 >= cfg.max_steps)


def padding_mask(attention_mask: torch.Tensor | None, right: bool = False) -> tuple[AttnMask, torch.Tensor | None]:
    """The attention mask and the (B, T) real tokens (None without padding). Right-padded batches need only the
    causal mask; anything else gets an explicit one. ``right``: the caller vouches for right padding (under
    ``torch.func.vmap``, which cannot look at the mask's values)."""
    if attention_mask is None:
        return AttnMask(True), None
    valid_BT = attention_mask.bool()
    if right:
        return AttnMask(True), valid_BT
    if bool(valid_BT.all()):
        return AttnMask(True), None
    if bool((valid_BT[:, 1:] <= valid_BT[:, :-1]).all()):  # every row a prefix: right padding
        return AttnMask(True), valid_BT
    T = valid_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=valid_BT.device).tril()
    # Padding queries attend to themselves, so no row of the mask is empty (no NaN); their outputs are unused.
    mask_BTT = (causal_TT[None] & valid_BT[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid_BT.device)[None]
    return AttnMask(False, mask_BTT[:, None]), valid_BT


class DynTRMBlock(nn.Module):
    """Pre-norm attention + FFN with residuals, and the halt head. Holds routers, not experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2 = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        # model.variant: each half is routed over its library or dense, independently (the ablations)
        self.attn = (DynSIHA(d, cfg.n_heads, cfg.attn_experts, cfg.attn_shared, cfg.attn_active, cfg.qk_norm)
                     if cfg.dyn_attn else DenseAttention(d, cfg.n_heads, cfg.qk_norm))
        self.ffn = (DynMoE(d, cfg.ffn_experts, cfg.ffn_active, cfg.ffn_mult * d if cfg.ffn_shared else 0)
                    if cfg.dyn_ffn else DenseFFN(d, round(cfg.ffn_active * cfg.ffn_mult * d)))
        self.halt_norm = RMSNorm(d, cfg.norm_eps)
        self.halt = nn.Linear(d, 2)  # (q_halt, q_continue)

    def forward(self, x_BTD: torch.Tensor, attn_lib: ExpertLibrary | None, ffn_lib: ExpertLibrary | None,
                ctx: StepContext) -> tuple[torch.Tensor, MoEStats, MoEStats]:
        """x -> (x after the block, the FFN router's sums, the attention routers' sums)."""
        a_BTD, attn_stats = self.attn(self.norm1(x_BTD), attn_lib, ctx)
        x_BTD = x_BTD + a_BTD
        y_BTD, ffn_stats = self.ffn(self.norm2(x_BTD), ffn_lib, ctx)
        return x_BTD + y_BTD, ffn_stats, attn_stats

    def halt_logits(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_halt, q_continue), each (B,), from the hidden state at one position per sample."""
        q_B2 = self.halt(self.halt_norm(x_BD)).float()
        return q_B2[:, 0], q_B2[:, 1]


def dihedral_rows(tokens_BT: torch.Tensor, sources_BTK: torch.Tensor) -> torch.Tensor:
    """The rows of ``model.dihedral_cells``' table that each token sums (B, T, 24): for each symmetry its own
    cell's source, its next cell's source, and whether the own cell agrees with its source (0 none, 1 no, 2 yes)."""
    own = sources_BTK[..., :len(DIHEDRAL)]
    agree = torch.where(own > 0, 1 + (own - 1 == tokens_BT[..., None]).long(), 0)
    offsets = torch.arange(N_SOURCES, device=tokens_BT.device) * N_SOURCE_VALUES
    agree_offsets = N_SOURCES * N_SOURCE_VALUES + 3 * torch.arange(len(DIHEDRAL), device=tokens_BT.device)
    return torch.cat([sources_BTK + offsets, agree + agree_offsets], -1)


def _dihedral_none_rows() -> list[int]:
    """The rows of ``model.dihedral_cells``' table that mean "no source" (each table's 0)."""
    return ([k * N_SOURCE_VALUES for k in range(N_SOURCES)]
            + [N_SOURCES * N_SOURCE_VALUES + 3 * g for g in range(len(DIHEDRAL))])


class ArcTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.d_head
        self.embed = nn.Embedding(cfg.vocab_size, d)
        # model.grid_coords: one table per coordinate (row, col; row_up, col_left under "borders"; the same four of
        # the next token under "next"); index 0 is "outside any grid", rows 1..30, columns 1..31 (a row
        # separator's is w + 1)
        n_coords = N_COORDS[cfg.grid_coords]
        shared = cfg.coord_tables == "shared" and n_coords > 0
        self.coord_embed = nn.ModuleList(nn.Embedding(MAX_SIDE + 2, d) for _ in range(0 if shared else n_coords))
        # model.coord_tables=shared: one table of index embeddings, and per coordinate a d x d map of it
        self.coord_embed_shared = nn.Embedding(MAX_SIDE + 2, d) if shared else None
        self.coord_embed_maps = nn.Parameter(torch.empty(n_coords, d, d)) if shared else None
        # model.pair_embed: which pair (counted back from the query) and which side of it a token is on
        self.pair_embed = nn.Embedding(2 * MAX_PAIR + 3, d) if cfg.pair_embed else None
        # model.dihedral_cells: per symmetry a table of the own cell's source colour (none, 0..9), one of the next
        # cell's, and one of whether the own cell agrees with its source (none, no, yes): DIHEDRAL_ROWS in all
        self.dihedral_embed = nn.Embedding(DIHEDRAL_ROWS, d) if cfg.dihedral_cells else None
        self.attn_expert_library = (ExpertLibrary(cfg.attn_experts, dh, cfg.attn_expert_hidden, dh) if cfg.dyn_attn
                                    else None)
        self.ffn_expert_library = ExpertLibrary(cfg.ffn_experts, d, cfg.ffn_mult * d, d) if cfg.dyn_ffn else None
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
        for table in self.coord_embed:  # smaller than the token's: what a cell is stays the larger signal
            nn.init.normal_(table.weight, std=0.5)
        if self.coord_embed_shared is not None:  # the same scale; each coordinate a random rotation of the table
            nn.init.normal_(self.coord_embed_shared.weight, std=0.5)
            for m in self.coord_embed_maps:
                nn.init.orthogonal_(m)
        if self.pair_embed is not None:
            nn.init.normal_(self.pair_embed.weight, std=0.5)
        if self.dihedral_embed is not None:  # each group of 8 tables sums to the scale of one coordinate's (0.5);
            nn.init.normal_(self.dihedral_embed.weight, std=0.5 / math.sqrt(len(DIHEDRAL)))
            self.dihedral_embed.weight[_dihedral_none_rows()] = 0  # "none" adds nothing at first
        nn.init.normal_(self.lm_head.weight, std=0.02)  # start near the uniform distribution
        for norm in (self.block.norm1, self.block.norm2, self.block.halt_norm, self.norm):
            nn.init.ones_(norm.weight)
        if self.attn_expert_library is not None:
            # Q = Σ_e w_e·out_e sums ~E/2 active experts with E[w²] = 1/2 each: w2 ~ N(0, (2/E)·(2/F)) (F the
            # expert's hidden width; silu halves the variance of its unit-variance input) starts Q, K, V near unit RMS.
            # Sparse: w = ReLU(z - g) with z ~ N(0, 1) has E[w²] = (1 + g²)(1 - Φ(g)) - g φ(g) in place of 1/2.
            n, hid = cfg.attn_experts, cfg.attn_expert_hidden
            if self.block.attn.sparse:
                g = self.block.attn.initial_gate
                tail, pdf = 0.5 * math.erfc(g / math.sqrt(2)), math.exp(-g * g / 2) / math.sqrt(2 * math.pi)
                attn_std = 1.0 / math.sqrt(n * ((1 + g * g) * tail - g * pdf) * hid / 2)
            else:
                attn_std = math.sqrt(2.0 / n) * math.sqrt(2.0 / hid)
            self.attn_expert_library.init_weights(out_std=attn_std * cfg.attn_init_scale)
        if self.ffn_expert_library is not None:  # (drawn before the block: the order every golden loss was made with)
            self.ffn_expert_library.init_weights(out_std=out_std * math.sqrt(1.0 / cfg.ffn_mult)
                                                 / math.sqrt(max(cfg.ffn_active, 1.0)))
        self.block.attn.init_weights(out_std)
        # DynMoE's shared expert / the dense FFN: the output scale of a hidden layer of ffn_mult·d, resp. its width
        ffn_hidden = (cfg.ffn_mult * cfg.d_model if self.ffn_expert_library is not None
                      else self.block.ffn.mlp.w1.out_features)
        self.block.ffn.init_weights(out_std * math.sqrt(cfg.d_model / ffn_hidden))
        # The halt head starts undecided toward "continue": sigmoid(q_halt - q_continue) = sigmoid(-2).
        nn.init.zeros_(self.block.halt.weight)
        self.block.halt.bias.copy_(torch.tensor([-2.0, 0.0]))
        if self.step_embed is not None:
            nn.init.normal_(self.step_embed, std=0.02)

    # ------------------------------------------------------------------------------------------ the recursion

    def should_halt(self, q_halt: torch.Tensor, q_continue: torch.Tensor, step: int) -> torch.Tensor:
        """:func:`should_halt` under this model's config: where generation asks (and tests force a step count)."""
        return should_halt(q_halt, q_continue, step, self.cfg)

    def context(self, tokens_BT: torch.Tensor, attention_mask: torch.Tensor | None, prompt_end: torch.Tensor | None,
                tap: Tap | None, vmapped: bool = False) -> tuple[StepContext, torch.Tensor, torch.Tensor]:
        """What every step of a forward pass shares: the step context (mask, padding, RoPE tables, tap), the
        position the halt head reads (B,) (default: the last real token) and the number of real tokens."""
        B, T = tokens_BT.shape
        attn, valid_BT = padding_mask(attention_mask, right=vmapped)
        if prompt_end is None:  # the last real position of every row (right or left padding)
            prompt_end = (T - 1 - attention_mask.flip(1).long().argmax(1) if attention_mask is not None
                          else torch.full((B,), T - 1, device=tokens_BT.device))
        if attn.mask is None:
            cos, sin = self.rope.prefix(T)
        else:  # e.g. left padding: number real tokens from 0 in every row, so outputs match the unpadded ones
            cos, sin = self.rope.at((valid_BT.long().cumsum(1) - 1).clamp(min=0))
        n_real = (valid_BT.sum() if valid_BT is not None else torch.tensor(B * T, device=tokens_BT.device)).clamp(min=1)
        return StepContext(0, cos, sin, attn, valid_BT, observer=tap, vmapped=vmapped), prompt_end, n_real

    def embed_tokens(self, tokens_BT: torch.Tensor, coords_BTK: torch.Tensor | None = None,
                     pairs_BT: torch.Tensor | None = None, sources_BTK: torch.Tensor | None = None,
                     vmapped: bool = False) -> torch.Tensor:
        """Token embeddings (B, T, D), plus the embeddings of each cell's place in its grid under
        ``model.grid_coords``, of its pair under ``model.pair_embed`` and of its symmetric sources under
        ``model.dihedral_cells`` (``coords_BTK``, ``pairs_BT``, ``sources_BTK``: given while decoding, else read
        from the tokens). ``vmapped``: the symmetric sources' rows are gathered and summed (``embedding_bag`` has
        no batching rule for ``torch.func.vmap``)."""
        x_BTD = self.embed(tokens_BT)
        need_coords = self.cfg.grid_coords != "off" and coords_BTK is None
        need_sources = self.dihedral_embed is not None and sources_BTK is None
        if need_coords or need_sources:  # one pass over the stream serves both
            found_BTK = grid_coords(tokens_BT, with_next=need_sources or self.cfg.grid_coords == "next")
            if need_sources:
                sources_BTK = dihedral_sources(tokens_BT, found_BTK)
            if need_coords:
                coords_BTK = found_BTK if self.cfg.grid_coords == "next" else found_BTK[..., :4]
        if self.dihedral_embed is not None:
            idx_BTK = dihedral_rows(tokens_BT, sources_BTK)
            if vmapped:
                x_BTD = x_BTD + self.dihedral_embed(idx_BTK).sum(-2)
            else:
                x_BTD = x_BTD + nn.functional.embedding_bag(idx_BTK.flatten(0, 1), self.dihedral_embed.weight,
                                                            mode="sum").view_as(x_BTD)
        if self.pair_embed is not None:
            x_BTD = x_BTD + self.pair_embed(pair_ids(tokens_BT) if pairs_BT is None else pairs_BT)
        if self.cfg.grid_coords != "off":
            # clamped: a token stream that is not a valid task (tests feed random ones) may count past 31
            coords_BTK = coords_BTK.clamp(max=MAX_SIDE + 1)
            if self.coord_embed_shared is not None:
                tables_KVD = torch.matmul(self.coord_embed_shared.weight, self.coord_embed_maps)
                for k, table_VD in enumerate(tables_KVD):
                    x_BTD = x_BTD + nn.functional.embedding(coords_BTK[..., k], table_VD)
            for k, table in enumerate(self.coord_embed):
                x_BTD = x_BTD + table(coords_BTK[..., k])
        return x_BTD

    def step(self, x_BTD: torch.Tensor, x0_BTD: torch.Tensor, s: int, ctx: StepContext
             ) -> tuple[torch.Tensor, MoEStats, MoEStats]:
        """Recursion step ``s`` (0-based): one application of the block to ``x`` (optionally with the input
        embedding ``x0`` re-injected and a learned step embedding added; both off by default). Returns the new x
        and the FFN and attention routers' sums."""
        if self.cfg.input_injection and s > 0:
            x_BTD = x_BTD + x0_BTD
        if self.step_embed is not None:
            x_BTD = x_BTD + self.step_embed[s]
        return self.block(x_BTD, self.attn_expert_library, self.ffn_expert_library, replace(ctx, step=s))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_end: torch.Tensor | None = None, *, halt: bool = False, tap: Tap | None = None,
                steps: torch.Tensor | None = None, detach_steps: int = 0, checkpoint: bool = False,
                vmapped: bool = False) -> ModelOutput:
        """The recursion over (B, T) ``tokens``; ``attention_mask`` (B, T) marks real tokens, the halt head reads
        ``prompt_end`` (B,) (default: the last real token), ``tap`` sees every routed module's ``Routed`` record.

        Training (default) runs all N steps for every sample. ``halt=True`` is inference: each sample stops at its
        halting step, or after ``steps`` (B,) steps when given (``generate.recur_until_halted``). The first
        ``detach_steps`` steps run without gradient, loss or tap (``train.grad_steps``: TRM's truncation).
        ``checkpoint`` (``train.checkpoint_steps``): each trained step keeps only its inputs for the backward and
        runs again there (activation checkpointing); same values and gradients, the tap sees each step once.
        ``vmapped``: the call runs under ``torch.func.vmap`` over stacked copies of the weights (``ttt.py``'s
        :meth:`~dyntrm.ttt.TTT.adapt_copies`), with right-padded (or unpadded) rows, which the caller vouches for
        (vmap cannot check; left padding would be read as right padding): the same values, computed without the
        operations vmap cannot batch (``StepContext.vmapped``).
        """
        if halt:
            return generate.recur_until_halted(self, tokens, attention_mask, prompt_end, tap=tap, steps_B=steps)[0]
        ctx, prompt_end_B, n_real = self.context(tokens, attention_mask, prompt_end, tap, vmapped)
        B, N = tokens.shape[0], self.cfg.max_steps
        batch_B = torch.arange(B, device=tokens.device)
        x0_BTD = self.embed_tokens(tokens, vmapped=vmapped)
        x_BTD = x0_BTD
        logits, q_halt, q_continue = [], [], []
        zero = tokens.new_zeros((), dtype=torch.float32)
        l1 = active = attn_l1 = attn_active = zero  # the routers' Σ_e w_e and active experts, summed over steps
        grad = torch.is_grad_enabled()
        for s in range(N):  # the same block every step; gradients flow back through all trained steps
            trained = s >= detach_steps
            with torch.set_grad_enabled(grad and trained):  # detached steps: no graph, no tap, no loss
                if checkpoint and grad and trained:
                    x_BTD, stats, attn_stats = self._checkpointed_step(x_BTD, x0_BTD, s, ctx)
                else:
                    x_BTD, stats, attn_stats = self.step(x_BTD, x0_BTD, s,
                                                         ctx if trained else replace(ctx, observer=None))
                logits.append(self.lm_head(self.norm(x_BTD)))  # deep supervision: every step predicts
                qh_B, qc_B = self.block.halt_logits(x_BTD[batch_B, prompt_end_B])  # ACT, at the last prompt position
            q_halt.append(qh_B)
            q_continue.append(qc_B)
            if trained:
                l1, active = l1 + stats.l1, active + stats.active
                attn_l1, attn_active = attn_l1 + attn_stats.l1, attn_active + attn_stats.active
        n_trained = N - detach_steps
        out = ModelOutput(torch.stack(logits), torch.stack(q_halt), torch.stack(q_continue),
                          torch.full((B,), N, device=tokens.device), l1 / (n_real * n_trained),
                          (active / (n_real * n_trained)).detach(), detach_steps)
        if self.cfg.attn_sparse:  # per real (token, head, channel) and step
            rows = n_real * n_trained * self.cfg.n_heads * 3
            out.attn_l1, out.attn_active = attn_l1 / rows, (attn_active / rows).detach()
        return out

    def _checkpointed_step(self, x_BTD: torch.Tensor, x0_BTD: torch.Tensor, s: int, ctx: StepContext
                           ) -> tuple[torch.Tensor, MoEStats, MoEStats]:
        """:meth:`step` under activation checkpointing (non-reentrant: the backward runs on the first forward's
        graph, whose saved tensors the second forward recreates). The tap sees the first forward only: its hooks
        sit on that graph's tensors, and a second capture would count every routing record twice."""
        calls = []

        def run(x: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, MoEStats, MoEStats]:
            calls.append(s)
            return self.step(x, x0, s, ctx if len(calls) == 1 else replace(ctx, observer=None))

        return torch.utils.checkpoint.checkpoint(run, x_BTD, x0_BTD, use_reentrant=False)

    # ------------------------------------------------------------------------------------------ generation

    def prefill(self, tokens: torch.Tensor, prompt_len: torch.Tensor, max_new: int, *,
                steps: torch.Tensor | None = None) -> tuple[torch.Tensor, generate.DecodeState]:
        """:func:`generate.prefill`: run the prompts, fix each sample's steps, fill one KV cache per step."""
        return generate.prefill(self, tokens, prompt_len, max_new, steps_B=steps)

    def decode(self, token: torch.Tensor, state: generate.DecodeState, tap: Tap | None = None) -> torch.Tensor:
        """:func:`generate.decode`: one token per sample through the cached steps; next-token logits (B, V)."""
        return generate.decode(self, token, state, tap)
