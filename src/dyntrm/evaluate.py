"""Evaluation (DESIGN §5): decode every test input under K views, un-augment, vote, score, report.

For every test input the model decodes under K views (dihedral x colour permutation; ``model/generate.py``:
batched, KV-cached, constrained to well-formed grids, never sized from the target), each answer is mapped back
with the view's exact inverse, and the candidates vote (``scoring.py``). :func:`run_eval` writes metrics.json, a
Kaggle-format submission.json and report.html.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .config import MAX_ANSWER_TOKENS
from .data.augment import Augmentation, views
from .data.dataset import EvalItem
from .data.tokens import Encoded, side_of
from .io import write_json
from .model.generate import Generation, generate_batched
from .rescore import candidate_likelihoods
from .scoring import (DIAGNOSTICS, Ranked, attempts, copy_input_reference, rerank, score, solved, targets_of,
                      vote)

if TYPE_CHECKING:
    from .ttt import TTT


@dataclass
class ItemResult:
    item: EvalItem
    ranked: list[Ranked]
    candidates: list[tuple[np.ndarray | None, float]]
    steps: list[int]
    attempts: list[np.ndarray] = field(default_factory=list)
    dropped: int = 0  # demonstrations left out of the prompt so that it fits the model
    too_long: bool = False  # not even the bare query fits: not decoded, answered by the fallback (its input)


def prompt_max_side(item: EvalItem) -> int:
    """The largest side of any grid in the prompt (demonstrations and test input): invariant under every view."""
    grids = [item.input] + [g for p in item.demos for g in (p.input, p.output)]
    return max(max(g.shape) for g in grids)


def prompt_limit(model, max_len: int | None = None, max_new: int = MAX_ANSWER_TOKENS) -> int | None:
    """The longest prompt ``model`` can answer: ``model.max_positions`` less room for a full answer (and at most
    ``max_len``); None for a stand-in model without a config (tests)."""
    room = getattr(getattr(model, "cfg", None), "max_positions", None)
    limits = [x for x in (max_len, None if room is None else room - max_new) if x is not None]
    return min(limits) if limits else None


@dataclass
class Fitted:
    """An item's prompts under its views, shortened to fit the model where needed."""

    item: EvalItem
    shown: EvalItem  # the item with the demonstrations its prompts kept
    prompts: list[tuple[Augmentation, Encoded]]  # one per view; none when even the bare query is too long
    dropped: int  # demonstrations left out
    length: int  # the longest view's prompt with every demonstration
    fitted_length: int  # ... with the demonstrations kept (the bare query's where even that is too long)


def _longest(encs: list[tuple[Augmentation, Encoded]]) -> int:
    return max(len(e) for _, e in encs)  # views transpose grids: their lengths differ


def fit_prompts(items: Sequence[EvalItem], n_views: int, seed: int, limit: int | None, header: bool
                ) -> list[Fitted]:
    """Every item's prompts under ``n_views`` views, seeded ``seed + task index`` (tasks numbered in order of first
    appearance): the test inputs of one task share their views, so per-view test-time training adapts one copy
    per view of the task, not of each input. A prompt over ``limit`` tokens loses demonstrations, the largest first
    (most cells; the last of equals first), until every view fits: an answer from fewer demonstrations beats none.
    An item whose bare query does not fit gets no prompt."""
    out = []
    task_index: dict[str, int] = {}
    for it in items:
        vs = views(n_views, seed=seed + task_index.setdefault(it.task_id, len(task_index)))
        order = sorted(range(len(it.demos)), key=lambda j: (it.demos[j].input.size + it.demos[j].output.size, j))
        keep = list(range(len(it.demos)))
        shown = it
        encs = full = [(v, it.prompt(v, header=header)) for v in vs]
        while limit is not None and _longest(encs) > limit and keep:
            keep.remove(order.pop())
            shown = replace(it, demos=tuple(it.demos[j] for j in keep))
            encs = [(v, shown.prompt(v, header=header)) for v in vs]
        fits = limit is None or _longest(encs) <= limit
        out.append(Fitted(it, shown, encs if fits else [], len(it.demos) - len(keep), _longest(full),
                          _longest(encs)))
    return out


def evaluate_items(model, items: Sequence[EvalItem], *, n_views: int = 8, seed: int = 0,
                   tokens_per_batch: int = 131072, max_len: int | None = None, cap_to_prompt: bool = False,
                   ttt: TTT | None = None, rank: str = "votes", **gen_kw) -> tuple[list[ItemResult], dict]:
    """Decode every item under ``n_views`` views, un-augment, vote. Returns per-item results and timing stats.

    A prompt that leaves no room for a full answer within ``model.max_positions`` (or exceeds ``max_len``) is
    shortened by :func:`fit_prompts`, counted as ``prompts_shortened``; an item whose bare query does not fit is not
    decoded, is answered by the fallback (its test input, which scores no diagnostics) and counted as ``too_long``.
    ``cap_to_prompt`` limits each answer to the largest grid side seen in its prompt (a heuristic read from the
    demonstrations, never the target; it bounds the cost of decoding from a barely trained model and can miss
    answers larger than every prompt grid).
    ``ttt`` (with steps > 0): every task is answered by a copy of the model fine-tuned on its demonstrations
    (``ttt.py``); under ``ttt.sizes == "checkpoint"`` the model itself first writes each answer's size header and
    the copy then decodes the cells of that shape (constrained decoding only; the pinned tokens then score 0 in a
    candidate's mean log-probability, votes' tie-break; ``likelihood`` and ``both`` rescore them). ``rank``:
    ``votes``, or ``likelihood`` / ``both`` to score every candidate under every view (``rescore.py``,
    ``scoring.rerank``).
    """
    limit = prompt_limit(model, max_len, gen_kw.get("max_new", MAX_ANSWER_TOKENS))
    header = bool(getattr(getattr(model, "cfg", None), "size_header", False))
    fitted = fit_prompts(items, n_views, seed, limit, header)
    prompts, owners, sides = [], [], []
    for i, f in enumerate(fitted):
        for v, e in f.prompts:
            prompts.append(e.tokens)
            owners.append((i, v))
            sides.append(prompt_max_side(f.item))
    # -- issue 12: one model for every prompt, or per task the model(s) its test-time training adapted, each with
    # the prompts it answers (one per task, or one per view of it under ``--ttt-mode view``)
    gens: list[Generation | None] = [None] * len(prompts)
    results: dict[int, ItemResult] = {}
    seconds = rank_seconds = 0.0
    adapted = ttt is not None and ttt.steps > 0
    fixed: list[tuple[int, int]] | None = None
    # --ttt-sizes checkpoint: the checkpoint writes each answer's size header, the adapted copy its cells (the pins
    # act through the grid constraint: unconstrained decoding keeps the copy's sizes, and the stats say so)
    if adapted and header and ttt.sizes == "checkpoint" and gen_kw.get("constrain", True):
        t0 = time.perf_counter()
        kw = dict(gen_kw, max_sides=sides) if cap_to_prompt else gen_kw
        heads = generate_batched(model, prompts, tokens_per_batch=tokens_per_batch, **{**kw, "max_new": 2})
        fixed = [(side_of(g.tokens[0]), side_of(g.tokens[1])) for g in heads]  # constrained: two size tokens
        seconds += time.perf_counter() - t0
    groups = (ttt.per_task(model, [f.shown for f in fitted], owners) if adapted  # each from what its prompts show
              else [([(model, list(range(len(prompts))))], None)])
    records = []
    for answerers, record in groups:
        records.append(record)
        t0 = time.perf_counter()
        for m, sel in answerers:
            kw = dict(gen_kw, max_sides=[sides[k] for k in sel]) if cap_to_prompt else dict(gen_kw)
            if fixed is not None:
                kw["sizes"] = [fixed[k] for k in sel]
            for k, g in zip(sel, generate_batched(m, [prompts[k] for k in sel], tokens_per_batch=tokens_per_batch,
                                                  **kw)):
                gens[k] = g
        seconds += time.perf_counter() - t0
        per_item: dict[int, list[tuple[Augmentation, Generation]]] = {}
        for k in sorted(k for _, sel in answerers for k in sel):
            per_item.setdefault(owners[k][0], []).append((owners[k][1], gens[k]))
        t0 = time.perf_counter()
        cands = {i: [(None if g.grid is None else v.invert_grid(g.grid), g.mean_logprob) for v, g in gs]
                 for i, gs in per_item.items()}
        ranked = {i: vote(c) for i, c in cands.items()}
        if rank != "votes":  # every candidate after each prompt it was decoded from (shortened where it had to be),
            order = list(ranked)  # scored by the model that answered that prompt, summed over the prompts
            totals = {i: np.zeros(len(ranked[i])) for i in order}
            for m, sel in answerers:
                shown: dict[int, list[tuple[Augmentation, np.ndarray]]] = {}
                for k in sel:
                    shown.setdefault(owners[k][0], []).append((owners[k][1], prompts[k]))
                mine = [i for i in order if i in shown]
                lls = candidate_likelihoods(m, [(shown[i], [r.grid for r in ranked[i]]) for i in mine],
                                            tokens_per_batch=tokens_per_batch)
                for i, item_lls in zip(mine, lls):
                    totals[i] += np.asarray(item_lls)
            for i in order:
                for r, ll in zip(ranked[i], totals[i]):
                    r.likelihood = float(ll)
                ranked[i] = rerank(ranked[i], rank)
        for i, gs in per_item.items():
            f = fitted[i]
            results[i] = ItemResult(f.item, ranked[i], cands[i], [g.steps for _, g in gs],
                                    attempts(ranked[i], fallback=f.item.input), f.dropped, False)
        rank_seconds += time.perf_counter() - t0
    # an item too long even alone was never decoded: the fallback answers it
    results_list = [results.get(i) or ItemResult(f.item, [], [], [], attempts([], fallback=f.item.input),
                                                 f.dropped, True) for i, f in enumerate(fitted)]
    n_tok = sum(len(g.tokens) for g in gens)
    stats = {"decode_seconds": seconds, "decode_tokens": n_tok, "decode_tokens_per_s": n_tok / max(seconds, 1e-9),
             "mean_steps": float(np.mean([g.steps for g in gens])) if gens else 0.0, "sequences": len(gens),
             "prompts_shortened": sum(f.dropped > 0 and bool(f.prompts) for f in fitted),
             "too_long": sum(not f.prompts for f in fitted), "views": n_views, "cap_to_prompt": cap_to_prompt,
             "rank": rank}
    if rank != "votes":
        stats["rank_seconds"] = rank_seconds
    if adapted:
        stats.update(ttt.summary(records), ttt_sizes=ttt.sizes if fixed is not None else "copy")  # as applied
    return results_list, stats


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
                "mean_steps": float(np.mean(r.steps)) if r.steps else 0.0, "demos_dropped": r.dropped,
                "too_long": r.too_long})
    return {"pass@1": scored["pass@1"], "pass@2": scored["pass@2"], **{k: scored[k] for k in DIAGNOSTICS},
            "n_tasks": len(scored["tasks"]),
            "n_test_inputs": len(results), **stats, "tasks": scored["tasks"]}


def score_line(m: dict[str, Any]) -> str:
    """One-line summary of :func:`metrics_of` output; a split without targets has no score, only a submission.
    Prompts that had to lose demonstrations, and inputs too long to answer at all, are counted in it."""
    if m["pass@2"] is None:
        line = f"no targets in these {m['n_test_inputs']} test inputs: submission only"
    else:
        line = f"pass@1 {m['pass@1']:.4f} pass@2 {m['pass@2']:.4f} over {m['n_tasks']} tasks"
        if m.get("shape@1") is not None:
            line += f" (diagnostics: right shape {m['shape@1']:.3f}, cells right {m['cells@1']:.3f})"
    if m.get("prompts_shortened"):
        line += f"; {m['prompts_shortened']} prompts too long for the model lost demonstrations"
    if m.get("too_long"):
        line += f"; {m['too_long']} test inputs too long even alone, answered with themselves"
    return line


def run_eval(model, items: Sequence[EvalItem], out_dir: Path, *, n_views: int, seed: int = 0,
             title: str = "evaluation", extra: dict | None = None, without_ttt: Sequence[ItemResult] = (),
             **gen_kw) -> tuple[dict, list[ItemResult]]:
    """Evaluate items and write metrics.json, submission.json and report.html into ``out_dir``; the report marks
    the answers that differ from ``without_ttt`` (the same items evaluated without test-time training)."""
    from .report import write_report  # matplotlib comes with it: loaded only when a report is written

    results, stats = evaluate_items(model, items, n_views=n_views, seed=seed, **gen_kw)
    metrics = {**metrics_of(results, stats), **(extra or {})}
    if metrics["pass@2"] is not None:
        metrics["reference_copy_input"] = copy_input_reference(items)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "submission.json", submission_of(results), indent=None)
    summary = {k: v for k, v in metrics.items() if k != "tasks"}
    write_report(out_dir / "report.html", title, summary=summary, results=results, without_ttt=without_ttt)
    return metrics, results
