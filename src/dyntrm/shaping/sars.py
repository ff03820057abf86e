"""SARS: Surprise-Aware Routing Shaping (DESIGN §3.7), verified against autograd.

During the main forward/backward, every routed module (the Q, K, V compositions and the FFN router) at every
recursion step is *captured*, keyed explicitly by ``(step, module)``: its expert inputs and routing weights on a
random subset of real tokens, and, from a hook on the composed output, the loss gradient ``delta`` there. From
these the **learning cost** of each (token, expert) pair is computed by hand with the chain rule -- the L2 norm of
the gradient that the token sends into all of the expert's parameters -- without materialising any per-sample
gradient. Then

    goodness = norm(routing logits) - norm(learning cost)        (norm: divide by the max |.| over experts)
    L_meta   = meta_weight * mean_{modules, tokens} H(softmax_e(r' + stopgrad(goodness)))

with ``r'`` the routing logits recomputed from the *detached* captured inputs, so the meta graph is local and
cheap. A separate backward of ``L_meta`` yields gradients for the routing parameters only; under DDP they are
averaged across ranks in :func:`all_reduce_meta_grads`, then added to the main gradients.

The captures are released as soon as the meta loss is built: nothing grows across steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..model.context import Routed
from ..model.experts import group_by_expert
from .base import Shaper


# ------------------------------------------------------------------------------------------------ pure maths

def silu_grad(a: torch.Tensor) -> torch.Tensor:
    """d silu(a) / da = sigmoid(a) * (1 + a * (1 - sigmoid(a))), as one fused kernel (silu's own backward)."""
    return torch.ops.aten.silu_backward(torch.ones_like(a), a)


def learning_cost(x: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    """Per (token, expert), the L2 norm of the gradient that token n sends into all parameters of expert e.

    For ``y = Σ_e w[:, e] · (silu(x @ w1[e]) @ w2[e])`` with upstream gradient ``delta = dL/dy``:

    - ``g_out = w_e · δ``; the gradient of ``w2[e]`` from token n is ``silu(a_e) ⊗ g_out`` (rank one), so
      ``‖∇w2_e‖ = |w_e| · ‖silu(a_e)‖ · ‖δ‖``;
    - ``g_hid = (w2[e] g_out) ⊙ silu'(a_e)``; the gradient of ``w1[e]`` is ``x ⊗ g_hid``, so
      ``‖∇w1_e‖ = ‖g_hid‖ · ‖x‖``;
    - cost = ``sqrt(‖∇w1_e‖² + ‖∇w2_e‖²)``, with ``a_e = x @ w1[e]``.

    Shapes: x (N, d_in), w (N, E), delta (N, d_out), w1 (E, d_in, F), w2 (E, F, d_out) -> (N, E). The cost is
    exactly 0 where ``w == 0``; when few weights are non-zero only those pairs are computed.
    """
    return learning_costs(x, w[:, None], delta[:, None], w1, w2)[:, 0]


def learning_costs(x: torch.Tensor, w_NCE: torch.Tensor, delta_NCd: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """:func:`learning_cost` for C weightings of the same experts on the same inputs (Q, K and V share the
    attention library and h): the pre-activations are computed once and reused. -> (N, C, E). Dense costs go in
    row chunks: 1024 on CPU (warm in cache), 16384 on CUDA (1024 launched ~2000 small kernels per step)."""
    N, C, E = w_NCE.shape
    if chunk is None:
        chunk = 16384 if x.is_cuda else 1024
    active = w_NCE != 0
    n_pairs = int(active.sum())
    out = torch.zeros(N, C, E, dtype=x.dtype, device=x.device)
    if n_pairs == 0:
        return out
    # Measured (1 thread): FFN-shaped, C = 1, 16 experts of width 512: the pairs grouped by expert cost 16 ms at
    # 2 of 16 active and 51 ms at half, all experts on every row 164 and 134 ms, so C = 1 always goes by pairs.
    # Attention-shaped, C = 3, 64 narrow experts: all experts at once share one pre-activation GEMM among q, k,
    # v and win from about a quarter active (72 vs 137 ms at half, 85 vs 73 at a quarter).
    if C > 1 and n_pairs > 0.25 * N * C * E:
        return _dense_costs(x, w_NCE, delta_NCd, w1, w2, chunk)
    for c in range(C):  # only the active pairs, grouped by expert
        out[:, c] = _sparse_cost(x, w_NCE[:, c], delta_NCd[:, c], w1, w2)
    return out


def _dense_costs(x, w_NCE, delta_NCd, w1, w2, chunk):
    """Every expert on every row as big GEMMs, in row chunks so the (chunk, E, F) intermediates stay small."""
    N, C, E = w_NCE.shape
    d_in, F_ = w1.shape[1], w1.shape[2]
    w1_cat = w1.transpose(0, 1).reshape(d_in, E * F_)  # a = x @ w1_cat: all experts in one GEMM
    w2_catT = w2.reshape(E * F_, -1).T  # u = δ @ w2_catT: (w2[e] δ) for all experts in one GEMM
    out = torch.empty(N, C, E, dtype=x.dtype, device=x.device)
    for i in range(0, N, chunk):
        xs = x[i:i + chunk]
        a = (xs @ w1_cat).view(-1, E, F_)
        s2 = torch.linalg.vector_norm(F.silu(a), dim=-1).pow(2)  # ‖silu(a_e)‖²  (n, E)
        sp = silu_grad(a)  # silu'(a), shared by the channels
        x2 = xs.pow(2).sum(-1, keepdim=True)
        for c in range(C):
            d = delta_NCd[i:i + chunk, c]
            u = (d @ w2_catT).view(-1, E, F_)  # w2[e] δ for every expert
            h2 = torch.linalg.vector_norm(u.mul_(sp), dim=-1).pow(2)  # ‖(w2[e] δ) ⊙ silu'(a_e)‖²
            out[i:i + chunk, c] = w_NCE[i:i + chunk, c].abs() * torch.sqrt(d.pow(2).sum(-1, keepdim=True) * s2
                                                                           + x2 * h2)
    return out


def _sparse_cost(x, w, delta, w1, w2):
    N, E = w.shape
    out = torch.zeros(N, E, dtype=x.dtype, device=x.device)
    e_idx, n_idx, counts_E = group_by_expert(w != 0)
    if e_idx.numel() == 0:
        return out
    counts = counts_E.tolist()
    xs, ds = x[n_idx], delta[n_idx]
    s2_parts, h2_parts = [], []
    for e, (xe, de) in enumerate(zip(torch.split(xs, counts), torch.split(ds, counts))):
        if counts[e]:
            a = xe @ w1[e]
            s2_parts.append(F.silu(a).pow(2).sum(-1))
            h2_parts.append(((de @ w2[e].T) * silu_grad(a)).pow(2).sum(-1))
    s2, h2 = torch.cat(s2_parts), torch.cat(h2_parts)
    cost = w[n_idx, e_idx].abs() * torch.sqrt(ds.pow(2).sum(-1) * s2 + xs.pow(2).sum(-1) * h2)
    out[n_idx, e_idx] = cost.to(out.dtype)
    return out


def max_abs_norm(t: torch.Tensor) -> torch.Tensor:
    """Divide each row by its maximum absolute value over the experts (last dim); an all-zero row stays zero.
    Exactly scale-invariant (no epsilon): learning costs are tiny (~1e-8) and scale with the loss normalisation,
    which differs between one process and DDP ranks."""
    m = t.abs().amax(-1, keepdim=True)
    return torch.where(m > 0, t / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(t))


def goodness(logits: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """``norm(routing logits) - norm(learning cost)``: high where the router already wants an expert and the
    expert would learn little from the token (low surprise)."""
    return max_abs_norm(logits) - max_abs_norm(cost)


def entropy_of_softmax(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------------------------ capture

@dataclass
class Capture:
    """One (step, module) capture: sampled rows of the expert inputs and routing, and their learning cost."""

    x: torch.Tensor  # (n, d_in), detached
    w: torch.Tensor  # (n, E), detached routing weights
    logits: torch.Tensor  # (n, E), detached routing logits of the forward
    rows: torch.Tensor  # (n,) indices into the module's rows
    router: Any
    channel: int
    library: Any
    cost: torch.Tensor | None = None  # (n, E), filled by the backward hook
    delta: torch.Tensor | None = None  # (n, d_out), kept only for tests (keep_delta)


class SARS(Shaper):
    kind = "sars"

    def __init__(self, cfg, model, rt, optimizer=None, *, keep_delta: bool = False):
        super().__init__(cfg, model, rt, optimizer)
        self.keep_delta = keep_delta
        self.captures: dict[tuple[int, str], Capture] = {}
        self.meta_grads = [torch.zeros_like(p) for p in self.routed_params]
        self.meta_loss_sum: Any = 0.0
        self.sums: dict[str, Any] = {}
        self.micro = 0  # micro-batches since the last finish()
        # token subsampling draws from the global torch RNG, which checkpoints save: resume stays exact

    def observe(self, r: Routed) -> None:
        self.stats.add(r)
        if not torch.is_grad_enabled():
            return
        rows = self._sample(r)
        x, w_nCE, logits_nCE = r.x.detach()[rows], r.weights.detach()[rows], r.logits.detach()[rows]
        for c, ch in enumerate(r.names):
            key = (r.step, ch)
            if key in self.captures:
                raise RuntimeError(f"SARS captured {key} twice in one micro-batch")
            self.captures[key] = Capture(x, w_nCE[:, c], logits_nCE[:, c], rows, r.router, c, r.library)
        r.out.register_hook(self._hook(r.step, r.names, rows))

    def _sample(self, r: Routed) -> torch.Tensor:
        """Real rows, each kept with probability ``token_rate`` (an unbiased estimate of the mean)."""
        n = r.x.shape[0]
        valid = torch.ones(n, dtype=torch.bool, device=r.x.device) if r.valid is None else r.valid
        rate = self.cfg.shaping.token_rate
        if rate < 1.0:
            valid = valid & (torch.rand(n, device=r.x.device) < rate)
        return torch.nonzero(valid, as_tuple=True)[0]

    def _hook(self, step: int, names: tuple[str, ...], rows: torch.Tensor):
        def hook(grad_NCd: torch.Tensor) -> None:
            g = grad_NCd.detach()[rows]
            # the gradient of *this* module's output, stored under its own (step, channel) keys
            caps = [self.captures[(step, ch)] for ch in names]
            lib, x = caps[0].library, caps[0].x
            w = torch.stack([cap.w for cap in caps], 1)
            costs = learning_costs(x, w, g.to(x.dtype), lib.w1.detach(), lib.w2.detach())
            for c, cap in enumerate(caps):
                cap.cost = costs[:, c]
                if self.keep_delta:
                    cap.delta = g[:, c]
        return hook

    def after_backward(self, counts) -> None:
        """Build this micro-batch's meta loss from its captures, backward it into the routing parameters only,
        and release the captures."""
        if not self.captures:
            return
        s = self.cfg.shaping
        terms = []
        recomputed: dict[tuple[int, int], torch.Tensor] = {}  # q, k, v share one routing GEMM per step
        for (step, name), cap in self.captures.items():
            if cap.cost is None:
                raise RuntimeError(f"SARS: no gradient reached module {name} at step {step}")
            good = goodness(cap.logits, cap.cost)
            key = (step, id(cap.router))
            if key not in recomputed:  # graph: routing parameters only (the inputs are detached)
                recomputed[key] = cap.router.logits(cap.x)
            r_new = recomputed[key][:, cap.channel]
            ent = entropy_of_softmax(r_new + good)
            # the subsample's expected size is token_rate x the rows: the sum estimates the mean without bias
            terms.append(ent.sum() * self.mean_weight(name, counts, s.token_rate))
            with torch.no_grad():  # logged means over modules (kept on the device until finish())
                for k, v in (("goodness", good.mean()), ("cost", cap.cost.sum() / (cap.w > 0).sum().clamp(min=1)),
                             ("meta_entropy", ent.mean())):
                    self.sums[k] = self.sums.get(k, 0.0) + v.detach() / len(self.captures)
        meta = s.meta_weight * torch.stack(terms).sum()
        grads = torch.autograd.grad(meta, self.routed_params, allow_unused=True)
        for buf, g in zip(self.meta_grads, grads):
            if g is not None:
                buf.add_(g)
        self.meta_loss_sum = self.meta_loss_sum + meta.detach()
        self.micro += 1
        self.captures.clear()

    def finish(self) -> dict[str, Any]:
        """Average the meta gradients across ranks, add them to the routing parameters' gradients."""
        m = super().finish()
        if self.cfg.shaping.meta_only:  # routing parameters learn from the meta loss alone
            for p in self.routed_params:
                p.grad = None
        all_reduce_meta_grads(self.meta_grads, self.rt)
        norm2 = float(sum(g.pow(2).sum() for g in self.meta_grads))
        for p, g in zip(self.routed_params, self.meta_grads):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            g.zero_()
        micro = max(self.micro, 1)
        m.update({"meta_loss": float(self.meta_loss_sum), "meta_grad_norm": math.sqrt(norm2),
                  **{k: float(v) / micro for k, v in self.sums.items()}})
        self.meta_loss_sum, self.sums, self.micro = 0.0, {}, 0
        return m


def all_reduce_meta_grads(grads: list[torch.Tensor], rt) -> None:
    """The one hand-written gradient all-reduce of the project: the meta gradients come from a backward outside
    DDP's hooks, so they are averaged across ranks here."""
    if not rt.distributed or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    rt.all_reduce_(flat)
    flat /= rt.world
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()
