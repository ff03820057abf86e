"""Routing shapers: the hook point between a training step and the routers (DESIGN §3.7).

A shaper is called around each micro-batch of a training step::

    tap = shaper.tap()                     # passed to model(..., tap=tap): sees every routed module's tensors
    loss = loss + shaper.extra_loss()      # FARS adds its term here (one backward)
    loss.backward()
    shaper.after_backward(norms)           # SARS: learning cost, goodness, meta loss, separate backward
    ...
    metrics = shaper.finish()              # all micro-batches done: meta gradients all-reduced and applied

Every shaper (``none`` included) records routing statistics through its tap: active experts, the entropy of the
normalised routing weights, and each expert's usage, per module kind (q, k, v, ffn), averaged over recursion steps
and real tokens. Keys are explicit ``(step, module)`` pairs, never positions in a list. Under DDP these logged
statistics (and SARS's goodness / cost figures) are rank 0's own, not averaged over ranks; the gradients are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MODULES = ("q", "k", "v", "ffn")


@dataclass
class Routed:
    """What a routed module shows the tap at one recursion step (C channels share x and the library)."""

    step: int
    names: tuple[str, ...]  # channel names: ("q", "k", "v") or ("ffn",)
    x: torch.Tensor  # (N, d_in) expert inputs
    logits: torch.Tensor  # (N, C, E)
    weights: torch.Tensor  # (N, C, E) = ReLU(logits), padding zeroed for the FFN
    out: torch.Tensor  # (N, C, d_out) or (N, d_out): the composed output, on the loss path
    valid: torch.Tensor | None  # (N,) real rows
    library: Any  # ExpertLibrary
    router: Any  # module with .logits(x) -> (N, C, E) or (N, E)


@dataclass
class RoutingStats:
    """Sums over a training step, kept on the device (no host sync until logged)."""

    active: dict[str, torch.Tensor] = field(default_factory=dict)
    entropy: dict[str, torch.Tensor] = field(default_factory=dict)
    usage: dict[str, torch.Tensor] = field(default_factory=dict)  # (E,) rows with w_e > 0
    rows: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def add(self, r: Routed) -> None:
        w = r.weights.detach()
        if r.valid is not None:
            w = w[r.valid]
        on = (w > 0).float()  # (n, C, E)
        p = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        ent = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)  # (n, C)
        for c, name in enumerate(r.names):
            for store, val in ((self.active, on[:, c].sum()), (self.entropy, ent[:, c].sum()),
                               (self.usage, on[:, c].sum(0)), (self.rows, torch.tensor(float(w.shape[0])))):
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

    def observe(self, step: int, name: str, **t: Any) -> None:
        self.stats.add(self._routed(step, name, t))

    @staticmethod
    def _routed(step: int, name: str, t: dict[str, Any]) -> Routed:
        logits, weights = t["logits"], t["weights"]
        if logits.dim() == 2:  # one channel (the FFN)
            logits, weights = logits[:, None], weights[:, None]
        return Routed(step, tuple(t.get("channels", (name,))), t["x"], logits, weights, t["out"], t["valid"],
                      t["library"], t["router"])

    def extra_loss(self, norms) -> torch.Tensor | None:
        return None

    def after_backward(self, norms) -> None:
        pass

    # --- per optimizer step
    def finish(self) -> dict[str, Any]:
        m = self.stats.metrics()
        self.stats = RoutingStats()
        return m
