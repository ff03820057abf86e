"""Expert libraries (DESIGN §3.2): E experts with ``ExpertMLP`` semantics ``w2(silu(w1(x)))``, bias-free.

A library stores its experts as stacked weights, ``w1: (E, d_in, F)`` and ``w2: (E, F, d_out)``, so that expert e
computes ``silu(x @ w1[e]) @ w2[e]``, and evaluates them with batched matmuls instead of a Python loop of modules.
Two ways to run it:

- :meth:`ExpertLibrary.compose` runs every expert on every row and returns weighted sums of their outputs (the
  attention library's dense composition); :meth:`ExpertLibrary.dense` returns the outputs themselves;
- :meth:`ExpertLibrary.grouped` runs each row through one expert, rows sorted by expert (the sparse FFN), as
  :func:`group_by_expert` lays them out.

:class:`ExpertMLP` is the plain per-expert module that defines the semantics; tests compare against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_by_expert(active_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (row, expert) pairs where the boolean ``active_NE`` is set, sorted by expert: their experts ``e_M``,
    their rows ``n_M``, and the number of rows of each expert ``counts_E`` (the layout of :meth:`grouped`)."""
    e_M, n_M = torch.nonzero(active_NE.T, as_tuple=True)  # row-major over (E, N): sorted by expert
    return e_M, n_M, torch.bincount(e_M, minlength=active_NE.shape[1])


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

    def dense(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: (N, d_in) -> ``out_END`` (E, N, d_out)."""
        E, F_ = self.n_experts, self.hidden
        # One GEMM (N, d) @ (d, E*F); bmm takes the expert-major strided view of it without a copy.
        s_NEF = F.silu(x_ND @ self.w1.transpose(0, 1).reshape(self.d_in, E * F_)).view(-1, E, F_)
        return torch.bmm(s_NEF.transpose(0, 1), self.w2)

    def compose(self, x_ND: torch.Tensor, w_NCE: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Dense composition: ``out[n, c] = Σ_e w[n, c, e] · Expert_e(x[n])`` for C weightings at once, every
        expert run once per row. (N, d_in), (N, C, E) -> (N, C, d_out).

        Rows are processed in chunks (1024 on CPU): the (chunk, E, F) hidden activations then stay small and warm
        in cache, which measured faster than one pass over all rows and than a per-expert loop (the loop's ratio:
        BENCHMARKS.md, section layers). On CUDA one chunk covers everything.
        """
        if chunk is None:
            chunk = x_ND.shape[0] if x_ND.is_cuda else 1024
        E, F_ = self.n_experts, self.hidden
        w1_cat = self.w1.transpose(0, 1).reshape(self.d_in, E * F_)
        outs = []
        for i in range(0, x_ND.shape[0], chunk):
            x = x_ND[i:i + chunk]
            s_nEF = F.silu(x @ w1_cat).view(-1, E, F_)
            out_End = torch.bmm(s_nEF.transpose(0, 1), self.w2)  # (E, n, d_out)
            outs.append(torch.bmm(w_NCE[i:i + chunk], out_End.transpose(0, 1)))  # (n, C, E) @ (n, E, d_out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _grouped_mm_ok(self, dt: torch.dtype, cuda: bool) -> bool:
        if not hasattr(torch, "_grouped_mm") or dt != (torch.bfloat16 if cuda else torch.float32):
            return False
        if not cuda and torch.compiler.is_compiling():  # the CPU kernel has no fake-tensor rule: dynamo cannot trace it
            return False
        # the kernel wants every row stride to be a multiple of 16 bytes
        per16 = 128 // torch.finfo(dt).bits  # elements per 16 bytes
        return all(n % per16 == 0 for n in (self.d_in, self.hidden, self.d_out))

    def grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, ``counts_E[e]`` rows for expert e -> outputs in the same order.

        Two grouped GEMMs (``torch._grouped_mm``: CUDA bf16, and CPU fp32 where it measured faster than a loop)
        with no host sync on CUDA; otherwise (float64, older torch) a loop over the experts that received
        rows. Either way an expert with no rows costs nothing.
        """
        dt = x_MD.dtype
        if x_MD.is_cuda and torch.is_autocast_enabled("cuda"):
            dt = torch.get_autocast_dtype("cuda")
        if self._grouped_mm_ok(dt, x_MD.is_cuda):
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
            hid = F.silu(torch._grouped_mm(x_MD.to(dt), self.w1.to(dt), offs=offs))
            return torch._grouped_mm(hid, self.w2.to(dt), offs=offs)
        counts = counts_E.tolist()
        outs = [F.silu(part @ self.w1[e]) @ self.w2[e]
                for e, part in enumerate(torch.split(x_MD, counts)) if counts[e]]
        return torch.cat(outs) if outs else x_MD.new_zeros(0, self.d_out)
