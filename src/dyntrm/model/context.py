"""The records the model's parts hand each other (DESIGN §3.1, §3.4-§3.7); a leaf: it imports nothing of dyntrm.

- :class:`AttnMask` and :class:`StepContext`: what one block application needs besides ``x`` (RoPE tables, mask,
  padding, the step's KV cache when generating, the routing tap);
- :class:`Routed`: what a routed module shows the tap at one recursion step, always shaped ``(N, C, E)``: N rows
  (tokens, or (token, head) pairs for attention), C channels (q, k, v for attention; ffn for DynMoE), E experts;
- :func:`routing_probs` and :func:`routing_entropy`: the one normalisation of routing weights that statistics,
  pictures and FARS share;
- :class:`ModelOutput`: what a forward pass returns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import torch

ATTN_CHANNELS = ("q", "k", "v")  # DynSIHA+ routes Q, K and V separately over one library
FFN_CHANNELS = ("ffn",)
CHANNELS = ATTN_CHANNELS + FFN_CHANNELS


@dataclass
class Routed:
    """One routed module at one recursion step. ``out`` is the tensor on the loss path: a hook on it sees the
    gradient of exactly this module's output (SARS)."""

    step: int
    names: tuple[str, ...]  # the C channel names: ATTN_CHANNELS or FFN_CHANNELS
    x: torch.Tensor  # (N, d_in) expert inputs
    logits: torch.Tensor  # (N, C, E) routing logits r
    weights: torch.Tensor  # (N, C, E) = ReLU(r), padding rows zeroed for the FFN
    out: torch.Tensor  # (N, C, d_out) composed outputs
    valid: torch.Tensor | None  # (N,) real rows; None: every row is real
    library: Any  # the ExpertLibrary the weights select from
    router: Any  # the module whose .logits(x) recomputes ``logits`` (N, C, E) with a graph to its parameters


Tap = Callable[[Routed], None]  # observes routing: SARS / FARS capture, statistics, pictures


def routing_probs(w: torch.Tensor) -> torch.Tensor:
    """ReLU routing weights normalised to sum to 1 over the experts (last dim); a row with no active expert stays 0."""
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def routing_entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of :func:`routing_probs` over the experts (last dim): 0 for one active expert or none.
    With S = Σ_e w_e it is log S - Σ_e w_e log w_e / S: three passes over w instead of the six of normalising
    first (the training step's statistics take it for every attention row of every step)."""
    S = w.sum(-1)
    ent = torch.log(S) - torch.xlogy(w, w).sum(-1) / S
    return torch.where(S > 0, ent, torch.zeros_like(ent)).clamp(min=0)


class KVStore(Protocol):
    """The keys and values of one recursion step while generating (``model/generate.py``'s ``KVCache``)."""

    k: torch.Tensor  # (B, H, capacity, d)
    v: torch.Tensor

    def fill(self, k_BTHd: torch.Tensor, v_BTHd: torch.Tensor) -> None: ...

    def write(self, k_B1Hd: torch.Tensor, v_B1Hd: torch.Tensor, pos_B: torch.Tensor) -> None: ...


@dataclass
class AttnMask:
    """How keys are masked: plain causal (right padding needs nothing more), or an explicit boolean mask
    broadcastable to (B, H, T_q, T_k), True where attention is allowed."""

    is_causal: bool
    mask: torch.Tensor | None = None


@dataclass
class StepContext:
    """What one block application needs besides x."""

    step: int
    cos: torch.Tensor  # RoPE tables: (T, d/2), or (B, T, d/2) when rows number their positions differently
    sin: torch.Tensor
    attn: AttnMask
    valid: torch.Tensor | None = None  # (B, T) real tokens, None when there is no padding
    cache: KVStore | None = None  # this step's keys and values, when generating
    decode_pos: torch.Tensor | None = None  # (B,) position of the single new token, when decoding
    observer: Tap | None = None  # receives every Routed record of the step
    static: bool = False  # shapes fixed by the caller (CUDA-graph capture): no data-dependent shapes, no host sync
    # under torch.func.vmap over stacked copies of the weights (ttt.py, several copies adapted at once): no Python
    # decision on tensor values; DynMoE dispatches through CopiesDispatch's vmap rule, attention runs as matmuls on
    # the CPU (math_attention), a sparse attention composition as the dense one
    vmapped: bool = False

    @property
    def valid_flat(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid.reshape(-1)

    @property
    def tapped(self) -> bool:
        return self.observer is not None

    @torch.compiler.disable
    def tap(self, routed: Routed) -> None:
        """Show ``routed`` to the observer, outside any compiled graph. An observer does Python bookkeeping (dicts
        of captures, autograd hooks) that dynamo would otherwise trace, guard on and recompile each time it
        changes: under ``torch.compile`` with SARS that hit the recompile limit on an H200."""
        self.observer(routed)

    def rows(self, idx: torch.Tensor) -> "StepContext":
        """The context of the batch rows ``idx`` only (generation drops halted rows from the batch)."""
        attn = self.attn if self.attn.mask is None else AttnMask(False, self.attn.mask[idx])
        cos, sin = (self.cos, self.sin) if self.cos.dim() == 2 else (self.cos[idx], self.sin[idx])
        valid = None if self.valid is None else self.valid[idx]
        return replace(self, cos=cos, sin=sin, attn=attn, valid=valid)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (S, B, T, V): every step's prediction; a halted sample repeats its last step
    q_halt: torch.Tensor  # (S, B)
    q_continue: torch.Tensor  # (S, B)
    steps: torch.Tensor  # (B,) recursion steps each sample ran
    moe_l1: torch.Tensor  # mean over steps and real tokens of Σ_e w_e (the sparsity penalty; 0 for dense)
    moe_active: torch.Tensor  # mean active FFN experts per real token and step (no gradient)
    grad_from: int = 0  # steps before this one ran without gradient (``detach_steps``): the loss skips them
    # under a sparse attention composition, per real (token, head, channel) and step: the mean Σ_e w_e (the
    # attention routers' penalty) and the mean active experts (no gradient); None when dense
    attn_l1: torch.Tensor | None = None
    attn_active: torch.Tensor | None = None

    @property
    def final_logits(self) -> torch.Tensor:
        return self.logits[-1]
