"""Token-budget batches with length bucketing, padding masks, and rank sharding (DESIGN §2, "Length").

A batch holds as many sequences as fit in ``tokens_per_batch`` once padded to the longest of them (rounded up to a
multiple of 8). Sequences are grouped by length inside shuffled windows, so padding stays small while batch
composition still changes every epoch. Under DDP every rank plans the same global list and takes every
``world``-th batch; the few trailing batches that would leave ranks uneven are dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .tokens import PAD, Encoded

PAD_MULTIPLE = 8


def padded(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def plan_batches(lengths: Sequence[int], tokens_per_batch: int, rng: np.random.Generator,
                 window: int = 1024) -> list[list[int]]:
    """Indices grouped into batches of at most ``tokens_per_batch`` padded tokens, in random order.

    Every index appears exactly once. A sequence longer than the budget gets a batch of its own (callers skip
    sequences over their maximum length before planning).
    """
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        cur: list[int] = []
        longest = 0  # padded length of the longest sequence in ``cur``
        for i in chunk.tolist():
            n = padded(int(lengths[i]))
            if cur and max(longest, n) * (len(cur) + 1) > tokens_per_batch:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            batches.append(cur)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def shard(batches: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], int]:
    """This rank's batches (every ``world``-th) and how many trailing batches were dropped to keep ranks even."""
    usable = len(batches) - len(batches) % world
    return batches[rank:usable:world], len(batches) - usable


@dataclass
class Batch:
    """A padded batch (right padding). Masks are aligned with ``tokens``."""

    tokens: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    target: torch.Tensor  # (B, T) bool, token t enters the LM loss (predicted from t-1)
    answer: torch.Tensor  # (B, T) bool, the query's answer tokens (ACT target)
    prompt_end: torch.Tensor  # (B,) int64, index of the query's OUT token
    changed: torch.Tensor  # (B, T) bool, output cells unlike the input's at that place (tokens.changed_cells)
    ids: list[str] = field(default_factory=list)  # provenance: task ids

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.attention_mask), move(self.target), move(self.answer),
                     move(self.prompt_end), move(self.changed), self.ids)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(seqs: Sequence[Encoded], ids: Sequence[str] = ()) -> Batch:
    """Right-pad encoded sequences into one batch."""
    T = padded(max(len(s) for s in seqs))
    B = len(seqs)
    tokens = np.full((B, T), PAD, np.int64)
    mask, target, answer, changed = (np.zeros((B, T), bool) for _ in range(4))
    for b, s in enumerate(seqs):
        n = len(s)
        tokens[b, :n] = s.tokens
        mask[b, :n] = True
        target[b, :n] = s.target
        answer[b, :n] = s.answer
        changed[b, :n] = s.changed
    prompt_end = torch.tensor([s.prompt_end for s in seqs], dtype=torch.int64)
    return Batch(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(target),
                 torch.from_numpy(answer), prompt_end, torch.from_numpy(changed), list(ids))
