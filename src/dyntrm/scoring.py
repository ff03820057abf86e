"""ARC scoring (DESIGN §5), pure functions on plain integer arrays: voting, pass@k, diagnostics, references.

Candidates vote: identical grids count together and are ranked by votes, then by their best mean token
log-probability, then by their bytes (so the order is total and deterministic); the first two are the attempts.
:func:`rerank` orders them by their log-likelihood under every view instead (``rescore.py``), or by votes first.
ARC's official metric is pass@2: a test input is solved when one of the first two attempts equals the target
exactly; a task scores the fraction of its test inputs solved; a set scores the mean over tasks. Beside it, two
diagnostics of attempt 1 (``shape@1``, ``cells@1``) and the scores of the trivial answer "the test input itself"
(:func:`copy_input_reference`), the line a model has to cross.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .data.dataset import EvalItem


def grid_key(g: np.ndarray) -> bytes:
    return bytes(g.shape) + np.ascontiguousarray(g, dtype=np.uint8).tobytes()


@dataclass
class Ranked:
    grid: np.ndarray
    votes: int
    best_mean_logprob: float
    likelihood: float | None = None  # total answer log-likelihood over the views (rescore.py), when computed


def vote(candidates: Sequence[tuple[np.ndarray | None, float]]) -> list[Ranked]:
    """Group identical grids; rank by votes, then best mean log-probability, then grid bytes (deterministic).

    ``candidates`` are (grid or None, mean token log-probability); None (a failed decode) casts no vote."""
    groups: dict[bytes, Ranked] = {}
    for grid, lp in candidates:
        if grid is None:
            continue
        k = grid_key(grid)
        if k in groups:
            groups[k].votes += 1
            groups[k].best_mean_logprob = max(groups[k].best_mean_logprob, lp)
        else:
            groups[k] = Ranked(np.asarray(grid), 1, lp)
    return rerank(list(groups.values()), "votes")


RANKINGS = ("votes", "likelihood", "both")


def rerank(ranked: Sequence[Ranked], mode: str) -> list[Ranked]:
    """Order candidates by ``mode``: ``votes`` (:func:`vote`'s order), ``likelihood`` (total log-likelihood over
    the views, then votes), or ``both`` (votes, then likelihood breaks ties, before the best mean log-probability
    of a single decode). Grid bytes end every key, so the order stays total."""
    if mode == "votes":
        key = lambda r: (-r.votes, -r.best_mean_logprob, grid_key(r.grid))  # noqa: E731
    elif mode == "likelihood":
        key = lambda r: (-r.likelihood, -r.votes, grid_key(r.grid))  # noqa: E731
    elif mode == "both":
        key = lambda r: (-r.votes, -r.likelihood, -r.best_mean_logprob, grid_key(r.grid))  # noqa: E731
    else:
        raise ValueError(f"ranking {mode!r}: expected one of {', '.join(RANKINGS)}")
    return sorted(ranked, key=key)


def attempts(ranked: Sequence[Ranked], k: int = 2, fallback: np.ndarray | None = None) -> list[np.ndarray]:
    """The first k attempts; with fewer candidates the last one repeats (ARC's format wants k grids); with none,
    ``fallback`` stands in (evaluation passes the test input, the best trivial answer), else a 1x1 zero grid."""
    grids = [r.grid for r in ranked[:k]]
    if not grids:
        grids = [np.zeros((1, 1), np.uint8) if fallback is None else np.asarray(fallback)]
    while len(grids) < k:
        grids.append(grids[-1])
    return grids


def solved(attempt_grids: Sequence[np.ndarray], target: np.ndarray, k: int) -> bool:
    target = np.asarray(target)
    return any(np.array_equal(np.asarray(a), target) for a in attempt_grids[:k])


def partial_credit(attempt: np.ndarray, target: np.ndarray) -> tuple[bool, float]:
    """Diagnostics, not ARC's metric: whether ``attempt`` has the target's shape, and the fraction of the target's
    cells it gets right (0 when the shape differs)."""
    attempt, target = np.asarray(attempt), np.asarray(target)
    if attempt.shape != target.shape:
        return False, 0.0
    return True, float((attempt == target).mean()) if target.size else 1.0


DIAGNOSTICS = ("shape@1", "cells@1")  # partial credit of attempt 1, averaged like pass@k (per task, then tasks)


def score(submission: dict[str, list[dict[str, Any]]], targets: dict[str, list[np.ndarray]],
          no_answer: frozenset[tuple[str, int]] = frozenset()) -> dict[str, Any]:
    """pass@1 and pass@2 of an ARC Prize submission ``{task: [{"attempt_1": g, "attempt_2": g}, ...]}``
    against ``{task: [target grid per test input]}``: per task the fraction of test inputs solved, overall the
    mean over tasks. A task missing from the submission scores 0.

    Beside them, two diagnostics of attempt 1 that show progress long before exact answers appear (they are not
    ARC's metric): ``shape@1``, the fraction of test inputs answered with the target's shape, and ``cells@1``, the
    fraction of target cells right (a wrongly shaped answer scores 0). Entries listed in ``no_answer`` (task,
    test index) hold a stand-in, not a model's answer, and get no diagnostic credit."""
    keys = ("pass@1", "pass@2") + DIAGNOSTICS
    per_task = {}
    for tid, tgts in targets.items():
        entries = submission.get(tid, [])
        acc = dict.fromkeys(keys, 0.0)
        for i, tgt in enumerate(tgts):
            if i >= len(entries):
                continue
            a = [np.asarray(entries[i]["attempt_1"]), np.asarray(entries[i]["attempt_2"])]
            acc["pass@1"] += solved(a, tgt, 1)
            acc["pass@2"] += solved(a, tgt, 2)
            if (tid, i) in no_answer:
                continue
            shape_ok, cells = partial_credit(a[0], tgt)
            acc["shape@1"] += shape_ok
            acc["cells@1"] += cells
        per_task[tid] = {k: v / len(tgts) for k, v in acc.items()}
    n = max(len(per_task), 1)
    return {**{k: sum(t[k] for t in per_task.values()) / n for k in keys}, "tasks": per_task}


def targets_of(items: Sequence[EvalItem]) -> dict[str, list[np.ndarray]]:
    """``{task: [target per test input, in order]}`` of the items that have one (the scorer's input)."""
    targets: dict[str, list] = {}
    for it in sorted(items, key=lambda it: (it.task_id, it.index)):
        if it.target is not None:
            targets.setdefault(it.task_id, []).append(it.target)
    return targets


def copy_input_reference(items: Sequence[EvalItem]) -> dict[str, Any]:
    """The scores of the trivial answer "the test input itself" (both attempts), on the same items: the reference
    beside which a model's pass@k and diagnostics are read."""
    sub: dict[str, list] = {}
    for it in sorted(items, key=lambda it: (it.task_id, it.index)):
        if it.target is not None:
            sub.setdefault(it.task_id, []).append({"attempt_1": it.input.tolist(), "attempt_2": it.input.tolist()})
    scored = score(sub, targets_of(items))
    return {k: scored[k] for k in ("pass@1", "pass@2") + DIAGNOSTICS}


def paired_gain(before: Sequence[float], after: Sequence[float], *, resamples: int = 10000, level: float = 0.95,
                seed: int = 0) -> tuple[float, float, float]:
    """The mean gain ``after - before`` over paired per-task scores (the same tasks, in the same order) and its
    percentile bootstrap interval at ``level``: tasks are drawn with replacement ``resamples`` times, and each draw's
    mean gain is taken. On a few dozen tasks one task is several points of pass@2; this says which gains are more
    than that noise. Returns (gain, low, high)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.ndim != 1 or b.shape != a.shape or b.size == 0:
        raise ValueError(f"paired_gain: expected two equal-length, non-empty score lists, got shapes "
                         f"{b.shape} and {a.shape}")
    d = a - b
    if not np.isfinite(d).all():
        raise ValueError("paired_gain: every score must be a finite number")
    if not 0 < level < 1:
        raise ValueError(f"paired_gain: level {level} is not in (0, 1)")
    if resamples < 1:
        raise ValueError(f"paired_gain: resamples {resamples} must be >= 1")
    draws = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[draws].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(lo), float(hi)
