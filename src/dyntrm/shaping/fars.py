"""FARS: Fisher-Aware Routing Shaping (DESIGN §3.7), the alternative shaper.

Each expert's cost is the mean of sqrt(Adam's ``exp_avg_sq``) over its parameters (a diagonal-Fisher proxy of
how expensive it is to move), treated as a constant; the loss gains ``fars_weight · Σ_e p_e · cost_e`` per token,
``p`` the normalised routing weights, averaged over modules and real tokens. One backward, together with the
main loss. Routing is recomputed from the detached expert inputs, so only the routing parameters feel it.
Before Adam has statistics (the first step) every cost is 0 and FARS does nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..model.context import Routed, routing_probs
from .base import Shaper


class FARS(Shaper):
    kind = "fars"

    def __init__(self, cfg, model, rt, optimizer=None):
        super().__init__(cfg, model, rt, optimizer)
        self.captures: list[tuple[tuple[str, ...], torch.Tensor, Any, Any]] = []  # one per routed call
        self.sums: dict[str, Any] = {}

    def observe(self, r: Routed) -> None:
        self.stats.add(r)
        if torch.is_grad_enabled():
            x = r.x.detach() if r.valid is None else r.x.detach()[r.valid]
            self.captures.append((r.names, x, r.router, r.library))

    @torch.no_grad()
    def expert_cost(self, lib) -> torch.Tensor:
        """(E,): mean sqrt(exp_avg_sq) over each expert's parameters; zeros before Adam's first step."""
        E = lib.n_experts
        total = torch.zeros(E, device=lib.w1.device)
        count = 0
        for p in (lib.w1, lib.w2):
            st = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            if "exp_avg_sq" not in st:
                return torch.zeros(E, device=lib.w1.device)
            total += st["exp_avg_sq"].sqrt().reshape(E, -1).sum(1)
            count += p[0].numel()
        return total / count

    def extra_loss(self, counts) -> torch.Tensor | None:
        if not self.captures:
            return None
        costs: dict[int, torch.Tensor] = {}
        terms = []
        for names, x, router, lib in self.captures:
            cost_E = costs.setdefault(id(lib), self.expert_cost(lib))
            p_nCE = routing_probs(F.relu(router.logits(x)))  # every channel (q, k, v) from one GEMM
            terms.append((p_nCE @ cost_E).sum() * self.mean_weight(names[0], counts))
        self.captures.clear()
        loss = self.cfg.shaping.fars_weight * torch.stack(terms).sum()
        self.sums["fars_loss"] = self.sums.get("fars_loss", 0.0) + loss.detach()
        return loss

    def finish(self) -> dict[str, Any]:
        m = super().finish()
        m.update({k: float(v) for k, v in self.sums.items()})
        self.sums = {}
        return m
