"""Evaluation and inference (DESIGN §5): constrained KV-cached decoding, augmentation voting, pass@k.

For every test input the model decodes under K views (dihedral x colour permutation), each answer is mapped back
with the view's exact inverse, identical grids vote together, and candidates are ranked by votes, then by their
best mean token log-probability, then by their bytes (so the order is total and deterministic). ARC's official
metric is pass@2: a test input is solved when one of the first two attempts equals the target exactly; a task
scores the fraction of its test inputs solved; a set scores the mean over tasks.

Decoding is batched across views and tasks by a token budget, uses the per-step KV caches and the ACT step count
decided at the prompt's end, and is constrained to well-formed grids: only colours, row separators and ``END`` can
be emitted, every row has the width of the first, at most 30 x 30. Nothing is ever sized from the target.
Scoring functions work on plain integer arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .config import MAX_ANSWER_TOKENS
from .data.augment import Augmentation, views
from .data.dataset import EvalItem
from .model.generate import Generation, generate_batched


# ------------------------------------------------------------------------------------------------ voting

def grid_key(g: np.ndarray) -> bytes:
    return bytes(g.shape) + np.ascontiguousarray(g, dtype=np.uint8).tobytes()


@dataclass
class Ranked:
    grid: np.ndarray
    votes: int
    best_mean_logprob: float


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
    return sorted(groups.values(), key=lambda r: (-r.votes, -r.best_mean_logprob, grid_key(r.grid)))


def attempts(ranked: Sequence[Ranked], k: int = 2) -> list[np.ndarray]:
    """The first k attempts; with fewer candidates the last one repeats (ARC's format wants k grids); with none,
    a 1x1 zero grid stands in (it scores like a miss unless the target is exactly that)."""
    grids = [r.grid for r in ranked[:k]]
    if not grids:
        grids = [np.zeros((1, 1), np.uint8)]
    while len(grids) < k:
        grids.append(grids[-1])
    return grids


# ------------------------------------------------------------------------------------------------ scoring

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


# ------------------------------------------------------------------------------------------------ evaluation

@dataclass
class ItemResult:
    item: EvalItem
    ranked: list[Ranked]
    candidates: list[tuple[np.ndarray | None, float]]
    steps: list[int]
    attempts: list[np.ndarray] = field(default_factory=list)


def prompt_max_side(item: EvalItem) -> int:
    """The largest side of any grid in the prompt (demonstrations and test input): invariant under every view."""
    grids = [item.input] + [g for p in item.demos for g in (p.input, p.output)]
    return max(max(g.shape) for g in grids)


def evaluate_items(model, items: Sequence[EvalItem], *, n_views: int = 8, seed: int = 0,
                   tokens_per_batch: int = 131072, max_len: int | None = None, cap_to_prompt: bool = False,
                   **gen_kw) -> tuple[list[ItemResult], dict]:
    """Decode every item under ``n_views`` views, un-augment, vote. Returns per-item results and timing stats.

    Items whose prompt leaves no room for a full answer within ``model.max_positions`` (or exceeds ``max_len``) are
    not decoded: no attempt, counted as unsolved, and reported as ``skipped_over_max_len``.
    ``cap_to_prompt`` limits each answer to the largest grid side seen in its prompt (a heuristic read from the
    demonstrations, never the target; it bounds the cost of decoding from a barely trained model and can miss
    answers larger than every prompt grid).
    """
    prompts, owners, sides = [], [], []
    skipped = 0
    room = getattr(getattr(model, "cfg", None), "max_positions", None)  # (tests pass stand-ins without a cfg)
    limits = [x for x in (max_len, None if room is None else room - gen_kw.get("max_new", MAX_ANSWER_TOKENS))
              if x is not None]
    limit = min(limits) if limits else None
    for i, it in enumerate(items):
        vs = views(n_views, seed=seed + i)
        encs = [(v, it.prompt(v)) for v in vs]
        if limit is not None and any(len(e) > limit for _, e in encs):
            skipped += 1
            continue
        for v, e in encs:
            prompts.append(e.tokens)
            owners.append((i, v))
            sides.append(prompt_max_side(it))
    t0 = time.perf_counter()
    if cap_to_prompt:
        gen_kw["max_sides"] = sides
    gens = generate_batched(model, prompts, tokens_per_batch=tokens_per_batch, **gen_kw)
    seconds = time.perf_counter() - t0
    per_item: list[list[tuple[Augmentation, Generation]]] = [[] for _ in items]
    for (i, v), g in zip(owners, gens):
        per_item[i].append((v, g))
    results = []
    for it, gs in zip(items, per_item):
        cands = [(None if g.grid is None else v.invert_grid(g.grid), g.mean_logprob) for v, g in gs]
        ranked = vote(cands)
        results.append(ItemResult(it, ranked, cands, [g.steps for _, g in gs], attempts(ranked)))
    n_tok = sum(len(g.tokens) for g in gens)
    stats = {"decode_seconds": seconds, "decode_tokens": n_tok, "decode_tokens_per_s": n_tok / max(seconds, 1e-9),
             "mean_steps": float(np.mean([g.steps for g in gens])) if gens else 0.0, "sequences": len(gens),
             "skipped_over_max_len": skipped, "views": n_views, "cap_to_prompt": cap_to_prompt}
    return results, stats


def submission_of(results: Sequence[ItemResult]) -> dict[str, list[dict[str, Any]]]:
    """ARC Prize format: one entry per test input, in order."""
    sub: dict[str, list] = {}
    for r in sorted(results, key=lambda r: (r.item.task_id, r.item.index)):
        a1, a2 = r.attempts[0], r.attempts[1]
        sub.setdefault(r.item.task_id, []).append({"attempt_1": a1.tolist(), "attempt_2": a2.tolist()})
    return sub


def metrics_of(results: Sequence[ItemResult], stats: dict) -> dict[str, Any]:
    """pass@1 / pass@2 overall (mean over tasks) and per task, plus decoding statistics."""
    targets = targets_of([r.item for r in results])
    no_answer = frozenset((r.item.task_id, r.item.index) for r in results if not r.ranked)
    scored = score(submission_of(results), targets, no_answer) if targets else {
        **dict.fromkeys(("pass@1", "pass@2") + DIAGNOSTICS), "tasks": {}}
    for r in results:
        t = scored["tasks"].get(r.item.task_id)
        if t is not None:
            t.setdefault("tests", []).append({
                "index": r.item.index, "votes": [c.votes for c in r.ranked[:4]],
                "solved@1": bool(r.item.target is not None and solved(r.attempts, r.item.target, 1)),
                "solved@2": bool(r.item.target is not None and solved(r.attempts, r.item.target, 2)),
                "mean_steps": float(np.mean(r.steps)) if r.steps else 0.0})
    return {"pass@1": scored["pass@1"], "pass@2": scored["pass@2"], **{k: scored[k] for k in DIAGNOSTICS},
            "n_tasks": len(scored["tasks"]),
            "n_test_inputs": len(results), **stats, "tasks": scored["tasks"]}


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


def score_line(m: dict[str, Any]) -> str:
    """One-line summary of :func:`metrics_of` output; a split without targets has no score, only a submission."""
    if m["pass@2"] is None:
        return f"no targets in these {m['n_test_inputs']} test inputs: submission only"
    line = f"pass@1 {m['pass@1']:.4f} pass@2 {m['pass@2']:.4f} over {m['n_tasks']} tasks"
    if m.get("shape@1") is not None:
        line += f" (diagnostics: right shape {m['shape@1']:.3f}, cells right {m['cells@1']:.3f})"
    return line


def split_items(cfg, split: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """The scored test inputs of a config's evaluation split (tasks filtered by ``data.max_side``)."""
    from .data.arc import filter_max_side, load_source
    from .data.dataset import eval_items

    src = load_source(cfg.data.source)
    name = split or cfg.data.eval_split
    if name not in src.splits and len(src.splits) == 1:
        name = next(iter(src.splits))  # a flat directory or a single file has one split: use it
    items = eval_items(filter_max_side(src.split(name), cfg.data.max_side))
    return items[:limit] if limit else items


def evaluate_subset(trainer, metrics_path) -> dict[str, Any] | None:
    """In-training evaluation: the EMA model, 1 view, the first ``train.eval_tasks`` test inputs of the eval split
    (a fixed subset); appended to metrics.jsonl by rank 0 while the other ranks wait."""
    from .train import append_jsonl

    cfg, rt = trainer.cfg, trainer.rt
    out = None
    if rt.is_main:
        items = split_items(cfg, limit=cfg.train.eval_tasks)
        model = trainer.ema_model()
        results, stats = evaluate_items(model, items, n_views=1, max_len=cfg.data.max_len)
        m = metrics_of(results, stats)
        out = {"kind": "eval", "step": trainer.state.step, "pass@1": m["pass@1"], "pass@2": m["pass@2"],
               "n_test_inputs": m["n_test_inputs"], "mean_steps": m["mean_steps"],
               "decode_tokens_per_s": m["decode_tokens_per_s"]}
        append_jsonl(metrics_path, out)
        rt.print0(f"eval @ step {out['step']}: {score_line(m)} ({out['n_test_inputs']} test inputs), "
                  f"mean steps {out['mean_steps']:.2f}")
    rt.barrier()
    return out
