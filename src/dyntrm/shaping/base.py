"""Routing shapers: the hook point between a training step and the routers (DESIGN §3.7).

A shaper is called around each micro-batch of a training step::

    tap = shaper.tap()                       # passed to model(..., tap=tap): sees every Routed record
    loss = loss + shaper.extra_loss(counts)  # FARS adds its term here (one backward)
    loss.backward()
    shaper.after_backward(counts)            # SARS: learning cost, goodness, meta loss, separate backward
    ...
    metrics = shaper.finish()                # all micro-batches done: meta gradients all-reduced and applied

Every shaper (``none`` included) records routing statistics through its tap: active experts, the entropy of the
normalised routing weights, and each expert's usage, per module kind (q, k, v, ffn), averaged over recursion steps
and real tokens. Keys are explicit ``(step, module)`` pairs, never positions in a list. Under DDP these logged
statistics (and SARS's goodness / cost figures) are rank 0's own, not averaged over ranks; the gradients are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.context import ATTN_CHANNELS, CHANNELS, Routed, routing_entropy


@dataclass
class RoutingStats:
    """Sums over a training step, kept on the device (no host sync until logged)."""

    active: dict[str, torch.Tensor] = field(default_factory=dict)
    entropy: dict[str, torch.Tensor] = field(default_factory=dict)
    usage: dict[str, torch.Tensor] = field(default_factory=dict)  # (E,) rows with w_e > 0
    rows: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def add(self, r: Routed) -> None:
        w_NCE = r.weights.detach()
        # sums over the real rows as products with the (N,) mask: no copy of the (N, C, E) weights
        real_N = torch.ones_like(w_NCE[:, 0, 0]) if r.valid is None else r.valid.to(w_NCE.dtype)
        usage_CE = torch.einsum("nce,n->ce", (w_NCE > 0).to(w_NCE.dtype), real_N)
        ent_C = real_N @ routing_entropy(w_NCE)
        rows = real_N.sum()
        for c, name in enumerate(r.names):
            for store, val in ((self.active, usage_CE[c].sum()), (self.entropy, ent_C[c]), (self.usage, usage_CE[c]),
                               (self.rows, rows)):
                store[name] = store.get(name, 0) + val

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.rows:
            n = float(self.rows[name])
            out[f"active_{name}"] = float(self.active[name]) / max(n, 1)
            out[f"entropy_{name}"] = float(self.entropy[name]) / max(n, 1)
            out[f"usage_{name}"] = (self.usage[name] / max(n, 1)).tolist()
        return out


class Shaper:
    """``none``: no shaping, statistics only."""

    kind = "none"

    def __init__(self, cfg, model, rt, optimizer=None):
        self.cfg, self.model, self.rt, self.optimizer = cfg, model, rt, optimizer
        self.stats = RoutingStats()
        self.routed_params = [p for n, p in model.named_parameters() if n.endswith((".proto", ".gate"))]

    # --- per micro-batch
    def tap(self):
        return self.observe if self.routed_params else None

    def observe(self, r: Routed) -> None:
        self.stats.add(r)

    def mean_weight(self, channel: str, counts, rate: float = 1.0) -> float:
        """The factor that turns a sum over the rows of one (step, ``channel``) into its share of the mean over
        every routed module (N steps x q, k, v, ffn) and every real row of the global batch (a token; a (token,
        head) pair for attention; a ``rate`` subsample of them). x world: the shapers' gradients are averaged
        across ranks afterwards."""
        heads = self.cfg.model.n_heads if channel in ATTN_CHANNELS else 1
        rows_global = float(counts.tokens) * self.rt.world * heads * rate
        return self.rt.world / (rows_global * (self.cfg.model.max_steps * len(CHANNELS)))

    def extra_loss(self, counts) -> torch.Tensor | None:
        return None

    def after_backward(self, counts) -> None:
        pass

    # --- per optimizer step
    def finish(self) -> dict[str, Any]:
        m = self.stats.metrics()
        self.stats = RoutingStats()
        return m
