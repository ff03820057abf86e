"""DynMoE (DESIGN §3.5): sparse ReLU-gated selection from the global FFN library, and its dense baseline.

Per token, ``r = h · Pᵀ/√d − g`` (prototypes ``P: (E, d)``, gates ``g: (E,)``), ``w = ReLU(r)``, and
``y = Σ_{e: w_e > 0} w_e · Expert_e(h)``. Only the active (token, expert) pairs are computed: pairs are sorted by
expert and each expert runs on its own contiguous rows (a grouped GEMM on CUDA). A token with no active expert gets
``y = 0`` and passes through the residual. The L1 norm of ``w`` is returned for the sparsity penalty whose
coefficient the trainer adapts toward ``ffn_active`` experts per token (ReMoE, made two-sided: ``train.next_l1_coef``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ExpertLibrary, ExpertMLP
from .layers import call_tap

if TYPE_CHECKING:
    from .dyntrm import StepContext


@dataclass
class MoEStats:
    """Per-call sums over real tokens (divide by the token count for means)."""

    l1: torch.Tensor  # Σ_tokens Σ_e w_e   (carries gradient: the sparsity penalty)
    active: torch.Tensor  # Σ_tokens #{e: w_e > 0}   (no gradient)


class DynMoE(nn.Module):
    """The FFN router. The experts live in the global library passed to :meth:`forward`."""

    def __init__(self, d_model: int, n_experts: int, target_active: float):
        super().__init__()
        self.d_model, self.n_experts, self.target_active = d_model, n_experts, target_active
        self.proto = nn.Parameter(torch.empty(n_experts, d_model))  # P
        self.gate = nn.Parameter(torch.empty(n_experts))  # g

    def init_weights(self) -> None:
        # With unit-RMS h and unit-normal prototypes, r + g ~ N(0, 1): a gate at the (1 - a/E) quantile makes a
        # experts active per token on average. Start at twice the target (at most half the library), as ReMoE
        # starts dense: a ReLU router whose expert is inactive gets no gradient for it, so starting at the
        # target lets experts die before the L1 controller can act; the controller then pulls sparsity down.
        nn.init.normal_(self.proto, std=1.0)
        q = 1.0 - min(2 * self.target_active, self.n_experts / 2) / self.n_experts
        nn.init.constant_(self.gate, math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * q - 1)).item())

    def logits(self, h_ND: torch.Tensor) -> torch.Tensor:
        return h_ND @ self.proto.T / math.sqrt(self.d_model) - self.gate

    def forward(self, h_BTD: torch.Tensor, lib: ExpertLibrary, ctx: "StepContext") -> tuple[torch.Tensor, MoEStats]:
        B, T, D = h_BTD.shape
        h_ND = h_BTD.reshape(B * T, D)
        r_NE = self.logits(h_ND)
        w_NE = F.relu(r_NE)
        if ctx.valid is not None:  # padding never activates an expert
            w_NE = w_NE * ctx.valid.reshape(B * T, 1)
        # (expert, token) pairs with w > 0, sorted by expert (nonzero is row-major over w.T).
        e_idx, n_idx = torch.nonzero(w_NE.T > 0, as_tuple=True)
        counts_E = torch.bincount(e_idx, minlength=self.n_experts)
        out_MD = lib.grouped(h_ND[n_idx], counts_E)
        out_MD = out_MD * w_NE[n_idx, e_idx].unsqueeze(1).to(out_MD.dtype)
        y_ND = torch.zeros_like(h_ND).index_add_(0, n_idx, out_MD.to(h_ND.dtype))
        if ctx.tap is not None:
            call_tap(ctx.tap, ctx.step, "ffn", x=h_ND, logits=r_NE, weights=w_NE, out=y_ND, valid=ctx.valid_flat,
                     library=lib, router=self)
        stats = MoEStats(w_NE.sum(), (w_NE > 0).sum().detach().to(w_NE.dtype))
        return y_ND.view(B, T, D), stats


class DenseFFN(nn.Module):
    """Baseline: one ``ExpertMLP`` of the same active width as DynMoE at its target (k experts of width F)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.mlp = ExpertMLP(d_model, hidden, d_model)

    def init_weights(self, out_std: float) -> None:
        nn.init.normal_(self.mlp.w1.weight, std=1.0 / math.sqrt(self.mlp.w1.in_features))
        nn.init.normal_(self.mlp.w2.weight, std=out_std)

    def forward(self, h_BTD: torch.Tensor, lib: None, ctx: "StepContext") -> tuple[torch.Tensor, MoEStats]:
        zero = h_BTD.new_zeros(())
        return self.mlp(h_BTD), MoEStats(zero, zero)
