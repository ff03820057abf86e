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

from .base import Shaper


class FARS(Shaper):
    kind = "fars"

    def __init__(self, cfg, model, rt, optimizer=None):
        super().__init__(cfg, model, rt, optimizer)
        self.captures: list[tuple[tuple[str, ...], torch.Tensor, Any, Any]] = []  # one per routed call
        self.sums: dict[str, Any] = {}

    def observe(self, step: int, name: str, **t: Any) -> None:
        r = self._routed(step, name, t)
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

    def extra_loss(self, norms) -> torch.Tensor | None:
        if not self.captures:
            return None
        n_modules = self.cfg.model.max_steps * 4
        H = self.cfg.model.n_heads
        costs: dict[int, torch.Tensor] = {}
        terms = []
        for names, x, router, lib in self.captures:
            cost = costs.setdefault(id(lib), self.expert_cost(lib))
            r = router.logits(x)  # routing of every channel (q, k, v) from one GEMM
            w = F.relu(r if r.dim() == 3 else r[:, None])  # (n, C, E)
            p = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
            rows_global = float(norms.tokens) * self.rt.world * (H if names != ("ffn",) else 1)
            terms.append((p @ cost).sum() * (self.rt.world / (rows_global * n_modules)))
        self.captures.clear()
        loss = self.cfg.shaping.fars_weight * torch.stack(terms).sum()
        self.sums["fars_loss"] = self.sums.get("fars_loss", 0.0) + loss.detach()
        return loss

    def finish(self) -> dict[str, Any]:
        m = super().finish()
        m.update({k: float(v) for k, v in self.sums.items()})
        self.sums = {}
        return m
