"""Statistics of a source under the serialisation of :mod:`dyntrm.data.tokens`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .arc import Source
from .tokens import sequence_length

PERCENTILES = (50, 90, 95, 99)


def split_stats(source: Source, split: str, max_len: int | None = None) -> dict[str, Any]:
    """Counts and sequence lengths of one split.

    A sequence is what one scored test input costs: every demonstration, then the test pair with its answer.
    """
    tasks = source.split(split)
    lengths = np.array([sequence_length([*t.train, p]) if p.output is not None
                        else sequence_length([*t.train, p], with_answer=False)
                        for t in tasks for p in t.test])
    out: dict[str, Any] = {
        "split": split,
        "tasks": len(tasks),
        "train_pairs": sum(len(t.train) for t in tasks),
        "test_inputs": sum(len(t.test) for t in tasks),
        "test_outputs": sum(p.output is not None for t in tasks for p in t.test),
        "max_side_le10": sum(t.max_side() <= 10 for t in tasks),
        "length_min": int(lengths.min()),
        "length_mean": float(lengths.mean()),
        "length_max": int(lengths.max()),
    }
    for q in PERCENTILES:
        out[f"length_p{q}"] = int(np.percentile(lengths, q, method="higher"))
    if max_len is not None:
        out["max_len"] = max_len
        out["skipped"] = int((lengths > max_len).sum())
    return out


def source_stats(source: Source, max_len: int | None = None) -> list[dict[str, Any]]:
    return [split_stats(source, s, max_len) for s in source.splits]
