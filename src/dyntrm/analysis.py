"""Expert self-organisation, measured (DESIGN §3.7's claim): routing entropy, experts in use, and the mutual
information between each token's expert choice and its task, colour and position.

For every routed module kind (q, k, v: one row per token and head; ffn: one row per token), pooled over recursion
steps, the *choice* of a row is its strongest expert (or "none" when no weight is positive). Mutual information
is the plug-in estimate from the joint counts, in bits; it is biased upward by about (|X|-1)(|Y|-1)/(2 n ln 2),
so compare models on the *same* rows (e.g. trained vs at initialisation), as :func:`routing_profile` is meant to
be used.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .data.arc import N_COLOURS
from .data.batching import Batch
from .model.context import Routed, routing_entropy

POSITION_BINS = 16


def mutual_information(x: np.ndarray, y: np.ndarray) -> float:
    """Plug-in I(X; Y) in bits of two integer label arrays."""
    if x.size == 0:
        return 0.0
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1)
    joint /= joint.sum()
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (px @ py)[nz])).sum())


def entropy_bits(x: np.ndarray) -> float:
    _, counts = np.unique(x, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


class _Recorder:
    """A model tap: for the current batch's real rows, each channel's choice and weight entropy, with labels."""

    def __init__(self):
        self.labels: dict[str, np.ndarray] = {}  # per real token of the current batch: task, colour, position
        self.valid: np.ndarray | None = None  # (B*T,) real tokens of the current batch
        self.rows: dict[str, dict[str, list[np.ndarray]]] = {}  # kind -> field -> arrays

    def __call__(self, r: Routed) -> None:
        w_NCE = r.weights.detach().float()
        per_token = w_NCE.shape[0] // self.valid.size  # attention rows are (token, head)
        keep = torch.from_numpy(np.repeat(self.valid, per_token))
        for c, ch in enumerate(r.names):
            w_nE = w_NCE[keep, c]
            none = torch.full_like(w_nE[:, 0], w_nE.shape[-1], dtype=torch.long)
            choice = torch.where(w_nE.max(-1).values > 0, w_nE.argmax(-1), none)
            ent = routing_entropy(w_nE)
            store = self.rows.setdefault(ch, {})
            store.setdefault("choice", []).append(choice.numpy())
            store.setdefault("entropy", []).append(ent.numpy())
            for k, v in self.labels.items():
                store.setdefault(k, []).append(np.repeat(v, per_token))


@torch.no_grad()
def routing_profile(model, batches: Sequence[Batch]) -> dict[str, float]:
    """Self-organisation figures of ``model`` on ``batches`` (all recursion steps pooled, real tokens only)."""
    model.eval()
    rec = _Recorder()
    task_index = {t: i for i, t in enumerate(dict.fromkeys(i for b in batches for i in b.ids))}
    for b in batches:
        B, T = b.tokens.shape
        rec.valid = b.attention_mask.reshape(-1).numpy()
        lengths = b.attention_mask.sum(1, keepdim=True).float()
        pos = (torch.arange(T)[None].float() / lengths * POSITION_BINS).clamp(max=POSITION_BINS - 1).long()
        rec.labels = {
            "task": np.repeat([task_index[i] for i in b.ids], T)[rec.valid],
            "colour": b.tokens.reshape(-1).numpy()[rec.valid],
            "position": pos.reshape(-1).numpy()[rec.valid],
        }
        model(b.tokens, b.attention_mask, b.prompt_end, tap=rec)
    out: dict[str, float] = {}
    for kind, f in rec.rows.items():
        choice, ent, task, colour, position = (np.concatenate(f[k]) for k in
                                               ("choice", "entropy", "task", "colour", "position"))
        n_experts = int(choice.max()) if choice.size else 0  # the "none" label is the largest
        usage = np.bincount(choice, minlength=n_experts + 1)[:n_experts] / max(choice.size, 1)
        is_colour = colour < N_COLOURS
        out[f"{kind}_entropy_nats"] = float(ent.mean())
        out[f"{kind}_experts_in_use"] = int((usage >= 0.01).sum())
        out[f"{kind}_choice_entropy_bits"] = entropy_bits(choice)
        out[f"{kind}_mi_task_bits"] = mutual_information(choice, task)
        out[f"{kind}_mi_colour_bits"] = mutual_information(choice[is_colour], colour[is_colour])
        out[f"{kind}_mi_position_bits"] = mutual_information(choice, position)
        out[f"{kind}_rows"] = int(choice.size)
    return out
