"""DynMoE (DESIGN §3.5): sparse ReLU-gated selection from the global FFN library, and its dense baseline.

Per token, ``r = h · Pᵀ/√d − g`` (prototypes ``P: (E, d)``, gates ``g: (E,)``), ``w = ReLU(r)``, and
``y = Σ_{e: w_e > 0} w_e · Expert_e(h)``. Only the active (token, expert) pairs are computed: pairs are sorted by
expert and each expert runs on its own contiguous rows (a grouped GEMM on CUDA). A token with no active expert gets
``y = 0`` and passes through the residual. The L1 norm of ``w`` is returned for the sparsity penalty, whose
coefficient :class:`SparsityController` moves toward ``ffn_active`` experts per token after every optimizer step
(ReMoE, made two-sided). The step's tap sees the routing as one ``Routed`` record of C = 1 channel.
Shapes: ``B`` batch, ``T`` time, ``D`` width, ``E`` experts, ``N = B·T`` rows, ``M`` active (row, expert) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .context import FFN_CHANNELS, Routed, StepContext
from .experts import ExpertLibrary, ExpertMLP, group_by_expert, grouped_mlp


@dataclass
class MoEStats:
    """Per-call sums over real rows of a ReLU router (divide by the row count for means): DynMoE's, and DynSIHA+'s
    under a sparse composition (rows (token, head, channel) there)."""

    l1: torch.Tensor  # Σ_rows Σ_e w_e   (carries gradient: the sparsity penalty)
    active: torch.Tensor  # Σ_rows #{e: w_e > 0}   (no gradient)


def initial_gate(target: float, n_experts: int) -> float:
    """The gate g that leaves ``min(2 target, E/2)`` of E experts active on average under ``w = ReLU(z - g)`` with
    z ~ N(0, 1) (unit-RMS inputs, unit-normal prototypes): the (1 - a/E) quantile of z. Twice the target, as ReMoE
    starts dense: a ReLU router whose expert is inactive gets no gradient for it, so starting at the target lets
    experts die before the L1 controller can act; the controller then pulls sparsity down."""
    q = 1.0 - min(2 * target, n_experts / 2) / n_experts
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * q - 1)).item()


class DynMoE(nn.Module):
    """The FFN router. The experts live in the global library passed to :meth:`forward`."""

    def __init__(self, d_model: int, n_experts: int, target_active: float, shared_hidden: int = 0):
        super().__init__()
        self.d_model, self.n_experts, self.target_active = d_model, n_experts, target_active
        self.proto = nn.Parameter(torch.empty(n_experts, d_model))  # P
        self.gate = nn.Parameter(torch.empty(n_experts))  # g
        # model.ffn_shared: an always-active expert beside the routed ones (DeepSeekMoE's shared expert); every
        # token trains it, so it learns at a dense FFN's pace while the library specialises
        self.shared = ExpertMLP(d_model, shared_hidden, d_model) if shared_hidden else None

    def init_weights(self, shared_out_std: float = 0.0) -> None:
        if self.shared is not None:
            nn.init.normal_(self.shared.w1.weight, std=1.0 / math.sqrt(self.d_model))
            nn.init.normal_(self.shared.w2.weight, std=shared_out_std)
        nn.init.normal_(self.proto, std=1.0)  # with unit-RMS h, r + g ~ N(0, 1)
        nn.init.constant_(self.gate, initial_gate(self.target_active, self.n_experts))

    def logits(self, h_ND: torch.Tensor) -> torch.Tensor:
        """Routing logits r: (N, D) -> (N, 1, E), one channel."""
        return (h_ND @ self.proto.T / math.sqrt(self.d_model) - self.gate)[:, None]

    def forward(self, h_BTD: torch.Tensor, lib: ExpertLibrary, ctx: StepContext) -> tuple[torch.Tensor, MoEStats]:
        B, T, D = h_BTD.shape
        h_ND = h_BTD.reshape(B * T, D)
        r_N1E = self.logits(h_ND)
        w_NE = F.relu(r_N1E[:, 0])
        if ctx.valid is not None:  # padding never activates an expert
            w_NE = w_NE * ctx.valid.reshape(B * T, 1)
        if ctx.static:  # fixed shapes (CUDA-graph capture): every expert, the inactive ones weighing exactly 0
            y_N1D = lib.compose(h_ND, w_NE[:, None]).to(h_ND.dtype)
        elif ctx.vmapped:  # copies of the weights side by side (TTT): the pairs of every copy in one dispatch
            y_N1D = CopiesDispatch.apply(h_ND, w_NE, lib.w1, lib.w2)[:, None]
        else:
            # viewed as (N, C=1, D) before use, so that the tap's ``out`` is the tensor on the loss path
            y_N1D = dispatch(h_ND, w_NE, lib.w1, lib.w2).view(B * T, 1, D)
        if ctx.tapped:
            ctx.tap(Routed(ctx.step, FFN_CHANNELS, h_ND, r_N1E, w_NE[:, None], y_N1D, ctx.valid_flat, lib, self))
        stats = MoEStats(w_NE.sum(), (w_NE > 0).sum().detach().to(w_NE.dtype))
        y_BTD = y_N1D.view(B, T, D)
        return (y_BTD if self.shared is None else y_BTD + self.shared(h_BTD)), stats


def dispatch(h_ND: torch.Tensor, w_NE: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
             pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``y[n] = Σ_{e: w[n, e] > 0} w[n, e] · (silu(h[n] @ w1[e]) @ w2[e])``, computing the active pairs only.
    ``pairs``: their (experts, rows, rows per expert) sorted by expert, when the caller has them
    (:func:`group_by_expert`'s layout)."""
    if pairs is None:
        e_M, n_M, counts_E = group_by_expert(w_NE > 0)
        col_M = e_M
    else:  # the experts may be numbered past w's columns (CopiesDispatch: copy k's expert e is k·E + e)
        e_M, n_M, counts_E = pairs
        col_M = e_M % w_NE.shape[1]
    out_MD = grouped_mlp(h_ND[n_M], w1_EDF, w2_EFD, counts_E)
    out_MD = out_MD * w_NE[n_M, col_M].unsqueeze(1).to(out_MD.dtype)
    return torch.zeros_like(h_ND).index_add_(0, n_M, out_MD.to(h_ND.dtype))


class CopiesDispatch(torch.autograd.Function):
    """DynMoE's sparse dispatch under ``torch.func.vmap`` over K copies of the model (test-time training of several
    copies at once, ``StepContext.vmapped``): which pairs are active depends on the data, which vmap cannot batch,
    so this function's vmap rule does the batching itself. Copy k's expert e becomes expert ``k·E + e`` of one
    library of K·E experts (or, when the experts are shared by the copies, stays expert e), copy k's row n becomes
    row ``k·N + n``, and one :func:`dispatch` serves every copy. The rule is written with differentiable operations
    on the copies' stacked tensors, so autograd records the backward there; the function is never differentiated
    by itself (called outside vmap it is a plain :func:`dispatch` without a gradient)."""

    @staticmethod
    def forward(h_ND, w_NE, w1_EDF, w2_EFD):
        return dispatch(h_ND, w_NE, w1_EDF, w2_EFD)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("CopiesDispatch is differentiated only under torch.func.vmap (StepContext.vmapped)")

    @staticmethod
    def vmap(info, in_dims, h_ND, w_NE, w1_EDF, w2_EFD):
        K = info.batch_size

        def copies(t: torch.Tensor, dim: int | None) -> torch.Tensor:
            return t.movedim(dim, 0) if dim is not None else t.expand(K, *t.shape)

        h_KND, w_KNE = copies(h_ND, in_dims[0]), copies(w_NE, in_dims[1])
        _, N, E = w_KNE.shape
        h_MD, w_ME = h_KND.reshape(K * N, -1), w_KNE.reshape(K * N, E)  # the copies' rows side by side
        if in_dims[2] is None and in_dims[3] is None:  # one library for all copies
            y = dispatch(h_MD, w_ME, w1_EDF, w2_EFD)
        else:  # copy k's rows see only its own experts, numbered k·E + e: pairs sorted by (copy, expert, row)
            k_P, e_P, n_P = torch.nonzero(w_KNE.transpose(1, 2) > 0, as_tuple=True)
            ke_P = k_P * E + e_P
            pairs = (ke_P, k_P * N + n_P, torch.bincount(ke_P, minlength=K * E))
            y = dispatch(h_MD, w_ME, copies(w1_EDF, in_dims[2]).flatten(0, 1), copies(w2_EFD, in_dims[3]).flatten(0, 1),
                         pairs)
        return y.view(K, N, -1), 0


@dataclass(frozen=True)
class SparsityController:
    """DynMoE's sparsity control (ReMoE): after every optimizer step the L1 coefficient is multiplied by ``factor``
    while more experts are active per token than the ``target`` and divided by it while fewer.

    ReMoE's coefficient stays positive (``floor=None``): it can only push activity down, and in short runs here the
    main loss pushed activity below the target and kept it there (README). With a ``floor`` the rule is two-sided:
    a positive coefficient that would shrink below ``floor`` turns into a reward for routing weight (``-floor``),
    which grows by ``factor`` per step while activity stays below the target and is dropped (back to ``+floor``) as
    soon as activity reaches it, so that the reward never lingers to overshoot. Either way the magnitude stays
    within ``cap``; at an exact tie the coefficient holds.
    """

    target: float
    factor: float
    floor: float | None = None
    cap: float = math.inf

    @classmethod
    def for_config(cls, cfg: Config, library: str = "ffn") -> "SparsityController":
        """The controller of DynMoE's router (``library="ffn"``) or of the attention routers (``"attn"``, for
        ``model.attn_active``)."""
        t, m = cfg.train, cfg.model
        target, size = (m.ffn_active, m.ffn_experts) if library == "ffn" else (m.attn_active, m.attn_experts)
        # two-sided only where a reward can act: routers learning from the main loss, a target below the library
        two_sided = t.l1_two_sided and not cfg.shaping.meta_only and target < size
        return cls(target, t.l1_factor, t.l1_init if two_sided else None, t.l1_max)

    def next_coef(self, coef: float, active: float) -> float:
        """The coefficient after a step that saw ``active`` experts per token on average (``factor`` 1: a fixed
        coefficient, whatever ``active``)."""
        if active == self.target or self.factor == 1:
            return coef
        above = active > self.target
        if self.floor is None or coef > 0:
            coef = coef * self.factor if above else coef / self.factor
            if self.floor is not None and coef < self.floor:
                coef = -self.floor  # the penalty has decayed away and activity is still low: reward instead
        else:  # a reward
            coef = self.floor if above else coef * self.factor
        return max(-self.cap, min(self.cap, coef))


class DenseFFN(nn.Module):
    """Baseline: one ``ExpertMLP`` of the same active width as DynMoE at its target (k experts of width F)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.mlp = ExpertMLP(d_model, hidden, d_model)

    def init_weights(self, out_std: float) -> None:
        nn.init.normal_(self.mlp.w1.weight, std=1.0 / math.sqrt(self.mlp.w1.in_features))
        nn.init.normal_(self.mlp.w2.weight, std=out_std)

    def forward(self, h_BTD: torch.Tensor, lib: None, ctx: StepContext) -> tuple[torch.Tensor, MoEStats]:
        zero = h_BTD.new_zeros(())
        return self.mlp(h_BTD), MoEStats(zero, zero)
