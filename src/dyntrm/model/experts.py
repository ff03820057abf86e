"""Expert libraries (DESIGN §3.2): E experts with ``ExpertMLP`` semantics ``w2(silu(w1(x)))``, bias-free.

A library stores its experts as stacked weights, ``w1: (E, d_in, F)`` and ``w2: (E, F, d_out)``, so that expert e
computes ``silu(x @ w1[e]) @ w2[e]``, and evaluates them with batched matmuls instead of a Python loop of modules.
Two ways to run it:

- :meth:`ExpertLibrary.dense` runs every expert on every row (the attention library's dense composition);
- :meth:`ExpertLibrary.grouped` runs each row through one expert, rows sorted by expert (the sparse FFN).

:class:`ExpertMLP` is the plain per-expert module that defines the semantics; tests compare against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMLP(nn.Module):
    """One expert as plain modules: the reference semantics of a library entry."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.w1 = nn.Linear(d_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)))


class ExpertLibrary(nn.Module):
    def __init__(self, n_experts: int, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.n_experts, self.d_in, self.hidden, self.d_out = n_experts, d_in, hidden, d_out
        self.w1 = nn.Parameter(torch.empty(n_experts, d_in, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_out))

    def init_weights(self, out_std: float) -> None:
        """w1 ~ N(0, 1/d_in) keeps pre-activations at unit scale; w2 ~ N(0, out_std^2) sets the output scale."""
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.d_in))
        nn.init.normal_(self.w2, std=out_std)

    @torch.no_grad()
    def load_experts(self, experts: list[ExpertMLP]) -> None:
        """Copy plain ``ExpertMLP`` weights in (nn.Linear stores the transpose)."""
        for e, m in enumerate(experts):
            self.w1[e].copy_(m.w1.weight.T)
            self.w2[e].copy_(m.w2.weight.T)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone (reference path, used by tests)."""
        return F.silu(x @ self.w1[e]) @ self.w2[e]

    def dense(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert on every row. Returns ``out_END`` and the pre-activations ``a_ENF`` (kept by autograd
        anyway; SARS reuses them instead of recomputing)."""
        # One GEMM (N, d) @ (d, E*F), viewed expert-major without a copy; bmm accepts the strided view.
        E, F_ = self.n_experts, self.hidden
        a_NEF = (x_ND @ self.w1.transpose(0, 1).reshape(self.d_in, E * F_)).view(-1, E, F_)
        a_ENF = a_NEF.transpose(0, 1)
        out_END = torch.bmm(F.silu(a_ENF), self.w2)
        return out_END, a_ENF

    def grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, ``counts_E[e]`` rows for expert e -> outputs in the same order.

        On CUDA in bf16 the experts run as two grouped GEMMs (``torch._grouped_mm``) with no host sync; elsewhere
        as a loop over the experts that received rows (an empty expert costs nothing).
        """
        if x_MD.is_cuda and hasattr(torch, "_grouped_mm"):
            dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x_MD.dtype
            if dt == torch.bfloat16:
                offs = torch.cumsum(counts_E, 0).to(torch.int32)
                hid = F.silu(torch._grouped_mm(x_MD.to(dt), self.w1.to(dt), offs=offs))
                return torch._grouped_mm(hid, self.w2.to(dt), offs=offs)
        counts = counts_E.tolist()
        outs = [F.silu(part @ self.w1[e]) @ self.w2[e]
                for e, part in enumerate(torch.split(x_MD, counts)) if counts[e]]
        return torch.cat(outs) if outs else x_MD.new_zeros(0, self.d_out)
