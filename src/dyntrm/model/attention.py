"""DynSIHA+ attention (DESIGN §3.4) and the dense multi-head baseline, sharing one attention core.

DynSIHA+: for every token and physical head, Q, K and V are *synthesised* from the global attention library.
With ``h = RMSNorm(x).view(B, T, H, d_head)`` and, for c in {q, k, v}, prototypes ``P_c: (E, d_head)`` and gates
``g_c: (E,)``::

    r_c = h · P_cᵀ / √d_head − g_c        w_c = ReLU(r_c)        Q = Σ_e w_q[e] · Expert_e(h)   (likewise K, V)

Dense composition (default): every expert runs once on every (token, head) row and the three weighted sums reuse
those outputs (``ExpertLibrary.compose``). Sparse composition (``model.attn_active`` below the library size, the
design's "MoE-style routing, then composition"): only the (row, expert) pairs active in some channel are computed,
as grouped GEMMs (``ExpertLibrary.compose_sparse``); an inactive expert weighs exactly 0 either way, so both give the
same Q, K, V, and an L1 penalty on w, whose coefficient a ``SparsityController`` moves as DynMoE's, holds the mean
active experts per (token, head, channel) at the target. Then 1-D RoPE on Q and K, causal scaled-dot-product
attention with padding, heads merged, output projection. The step's tap sees q, k and v routing as one ``Routed``
record of C = 3 channels, whichever composition ran.
Shapes: ``B`` batch, ``T`` time, ``H`` heads, ``d`` head width, ``E`` experts, ``N = B·T·H`` rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .context import ATTN_CHANNELS, AttnMask, Routed, StepContext
from .experts import ExpertLibrary
from .layers import RMSNorm, apply_rope
from .moe import MoEStats, initial_gate


def attend(q_BTHd: torch.Tensor, k_BTHd: torch.Tensor, v_BTHd: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """RoPE + scaled-dot-product attention -> (B, T, H, d). When generating, the step's KV cache takes the new keys
    and values: all of them at prefill, one per row while decoding (then attention reads the cached ones)."""
    q_BTHd, k_BTHd = apply_rope(q_BTHd, ctx.cos, ctx.sin), apply_rope(k_BTHd, ctx.cos, ctx.sin)
    if ctx.cache is not None:
        if ctx.decode_pos is None:
            ctx.cache.fill(k_BTHd, v_BTHd)
        else:
            ctx.cache.write(k_BTHd, v_BTHd, ctx.decode_pos)
            L = ctx.attn.mask.shape[-1]  # keys up to the furthest position in the batch; the mask does the rest
            k_BHLd, v_BHLd = ctx.cache.k[:, :, :L], ctx.cache.v[:, :, :L]
            o_BHTd = F.scaled_dot_product_attention(q_BTHd.transpose(1, 2), k_BHLd.to(q_BTHd.dtype),
                                                    v_BHLd.to(q_BTHd.dtype), attn_mask=ctx.attn.mask)
            return o_BHTd.transpose(1, 2)
    q_BHTd, k_BHTd, v_BHTd = q_BTHd.transpose(1, 2), k_BTHd.transpose(1, 2), v_BTHd.transpose(1, 2)
    if ctx.vmapped and not q_BHTd.is_cuda:  # the CPU's SDPA has no batching rule (vmap would loop over the copies)
        return math_attention(q_BHTd, k_BHTd, v_BHTd, ctx.attn).transpose(1, 2)
    # on CUDA, SDPA even under vmap: where a kernel lacks a batching rule vmap loops over the copies, which is right
    # and keeps the fused kernels' memory (math_attention holds every (T, T) score matrix for the backward)
    o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, attn_mask=ctx.attn.mask,
                                            is_causal=ctx.attn.is_causal)
    return o_BHTd.transpose(1, 2)


def math_attention(q_BHTd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor, attn: AttnMask) -> torch.Tensor:
    """``softmax(q kᵀ / √d + mask) v`` as matmuls, the softmax in at least fp32: what SDPA computes, for
    ``torch.func.vmap``. A causal mask is SDPA's: query i sees keys 0..i."""
    T, S = q_BHTd.shape[-2], k_BHSd.shape[-2]
    scores = q_BHTd @ k_BHSd.transpose(-1, -2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) / math.sqrt(q_BHTd.shape[-1])
    allowed = attn.mask
    if attn.is_causal:
        causal = torch.ones(T, S, dtype=torch.bool, device=q_BHTd.device).tril()
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).to(v_BHSd.dtype) @ v_BHSd


class QKNorm(nn.Module):
    """``model.qk_norm``: queries and keys RMS-normalised over the head's channels, each with a learned gain (the
    same for every head), so that attention logits keep one scale whichever experts composed them."""

    def __init__(self, d_head: int, eps: float = 1e-6):
        super().__init__()
        self.q, self.k = RMSNorm(d_head, eps), RMSNorm(d_head, eps)

    def reset(self) -> None:
        nn.init.ones_(self.q.weight)
        nn.init.ones_(self.k.weight)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(q), self.k(k)


class DynSIHA(nn.Module):
    """Routers (P_c, g_c for c in q, k, v) and the output projection; the experts are the global library."""

    def __init__(self, d_model: int, n_heads: int, n_experts: int, shared: bool = False, active: float = 0.0,
                 qk_norm: bool = False):
        super().__init__()
        self.d_model, self.n_heads, self.d_head, self.n_experts = d_model, n_heads, d_model // n_heads, n_experts
        self.target_active = active if 0 < active < n_experts else None  # None: dense composition
        self.proto = nn.Parameter(torch.empty(3, n_experts, self.d_head))  # P_q, P_k, P_v
        self.gate = nn.Parameter(torch.empty(3, n_experts))  # g_q, g_k, g_v
        self.out = nn.Linear(d_model, d_model, bias=False)
        # model.attn_shared: an always-active linear expert over the full width (DeepSeekMoE's shared expert): the
        # library's experts see one head's slice of h only; this path lets every head read the whole residual stream
        self.shared = nn.Linear(d_model, 3 * d_model, bias=False) if shared else None
        self.qk_norm = QKNorm(self.d_head) if qk_norm else None

    @property
    def sparse(self) -> bool:
        return self.target_active is not None

    @property
    def initial_gate(self) -> float:
        """Dense: 0, half the experts active; sparse: twice the target active (``moe.initial_gate``)."""
        return initial_gate(self.target_active, self.n_experts) if self.sparse else 0.0

    def init_weights(self, out_std: float) -> None:
        nn.init.normal_(self.proto, std=1.0)  # r_c + g_c ~ N(0, 1) for unit-RMS h
        nn.init.constant_(self.gate, self.initial_gate)
        nn.init.normal_(self.out.weight, std=out_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.weight, std=1.0 / math.sqrt(self.d_model))
        if self.qk_norm is not None:
            self.qk_norm.reset()

    def logits(self, h_ND: torch.Tensor) -> torch.Tensor:
        """Routing logits r_c for q, k and v at once: (N, d) -> (N, 3, E)."""
        r = h_ND @ self.proto.reshape(3 * self.n_experts, self.d_head).T / math.sqrt(self.d_head)
        return r.view(-1, 3, self.n_experts) - self.gate

    def forward(self, h_BTD: torch.Tensor, lib: ExpertLibrary, ctx: StepContext
                ) -> tuple[torch.Tensor, MoEStats]:
        """(B, T, D) -> the attention output (B, T, D) and, under a sparse composition, the routing sums over real
        (token, head, channel) rows (zeros when dense: no penalty, nothing to control)."""
        B, T, D = h_BTD.shape
        H, d = self.n_heads, self.d_head
        h_ND = h_BTD.reshape(B * T * H, d)  # one row per (token, head)
        r_NCE = self.logits(h_ND)
        w_NCE = F.relu(r_NCE)
        valid_N = None if ctx.valid is None else ctx.valid_flat.repeat_interleave(H)
        # Q, K, V = Σ_e w_c[e] · Expert_e(h), each expert run once per row (static shapes: the dense form)
        if self.sparse and not (ctx.static or ctx.vmapped):
            qkv_NCd = lib.compose_sparse(h_ND, w_NCE, valid_N)  # padding rows get 0: no query reads them
        else:  # under vmap the path of plain differentiable operations (the others are autograd Functions); a sparse
            #    composition then computes every expert (the same values, E / attn_active times the arithmetic)
            qkv_NCd = lib.compose(h_ND, w_NCE, path="experts" if ctx.vmapped else None)
        if ctx.tapped:  # one record for q, k and v: they share the rows and the library
            ctx.tap(Routed(ctx.step, ATTN_CHANNELS, h_ND, r_NCE, w_NCE, qkv_NCd, valid_N, lib, self))
        qkv_BTHCd = qkv_NCd.view(B, T, H, 3, d)
        if self.shared is not None:
            qkv_BTHCd = qkv_BTHCd + self.shared(h_BTD).view(B, T, 3, H, d).transpose(2, 3)
        q_BTHd, k_BTHd, v_BTHd = qkv_BTHCd.unbind(3)
        if self.qk_norm is not None:
            q_BTHd, k_BTHd = self.qk_norm(q_BTHd, k_BTHd)
        o_BTHd = attend(q_BTHd, k_BTHd, v_BTHd, ctx)
        return self.out(o_BTHd.reshape(B, T, D)), self.stats(w_NCE, valid_N)

    def stats(self, w_NCE: torch.Tensor, valid_N: torch.Tensor | None) -> MoEStats:
        """Σ w and the active count over real rows and the three channels (the sparse composition's penalty)."""
        if not self.sparse:
            zero = w_NCE.new_zeros(())
            return MoEStats(zero, zero)
        if valid_N is not None:
            w_NCE = w_NCE * valid_N[:, None, None]
        return MoEStats(w_NCE.sum(), (w_NCE > 0).sum().detach().to(w_NCE.dtype))


class DenseAttention(nn.Module):
    """Baseline: ordinary multi-head attention with linear Q, K, V; same core (RoPE, SDPA, cache)."""

    def __init__(self, d_model: int, n_heads: int, qk_norm: bool = False):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.qk_norm = QKNorm(self.d_head) if qk_norm else None

    def init_weights(self, out_std: float) -> None:
        nn.init.normal_(self.qkv.weight, std=1.0 / math.sqrt(self.qkv.in_features))
        nn.init.normal_(self.out.weight, std=out_std)
        if self.qk_norm is not None:
            self.qk_norm.reset()

    def forward(self, h_BTD: torch.Tensor, lib: None, ctx: StepContext) -> tuple[torch.Tensor, MoEStats]:
        B, T, D = h_BTD.shape
        q_BTHd, k_BTHd, v_BTHd = self.qkv(h_BTD).view(B, T, 3, self.n_heads, self.d_head).unbind(2)
        if self.qk_norm is not None:
            q_BTHd, k_BTHd = self.qk_norm(q_BTHd, k_BTHd)
        o_BTHd = attend(q_BTHd, k_BTHd, v_BTHd, ctx)
        zero = h_BTD.new_zeros(())
        return self.out(o_BTHd.reshape(B, T, D)), MoEStats(zero, zero)
