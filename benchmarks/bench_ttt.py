"""Test-time training (issue 12): pass@2 without TTT and with TTT of all / routing / norms, on the same items.

    python benchmarks/bench_ttt.py --checkpoint RUN --ladder DIR [--limit N] [--steps K] [--views V] [--quick]

One checkpoint, two item sets: the held-out (evaluation) split of a sanity ladder written by ``dyntrm data synth``
(``--ladder``), and the ARC-AGI-1 evaluation tasks whose grids all fit in 10x10, the first ``--limit`` of them
(never trained on). Each set is evaluated without TTT, then with K steps of TTT of all parameters, of the routers
only (prototypes and gates) and of the RMSNorm weights only. Every evaluation decodes once and ranks the same
candidates by votes and by view-consistent likelihood (``--rank`` of ``dyntrm eval``), so the two rankings are
compared on identical answers. Reported: pass@2 under each ranking, TTT seconds per task, the task's
leave-one-out loss at the first and last TTT step, the mean halting step over all answers and over solved ones
(and, on the test inputs each setting solves, without TTT and with it: the ACT goal is that it falls), and the
share of the full-TTT gain that routing-only TTT recovers. Answers are capped to the largest side in their prompt
where the model has no size header, as in bench_sanity.py.

Every gain over no TTT comes with a 95% paired bootstrap interval over the set's tasks (one task is several points
of pass@2 on a few dozen). ``--skip S`` measures on a slice disjoint from the default one (settings are chosen there
and then measured on the default slice). ``--pool`` adds, beside each TTT setting, the checkpoint's own candidates
pooled into its votes. ``--joint-minutes M`` adds the checkpoint fine-tuned for M minutes on the demonstrations of
all the set's tasks together (`dyntrm train --init`: TRM's transductive step, taken at test time), alone and with
each TTT setting after it; its minutes are shared out over the set's tasks in "TTT s / task".

A ladder of families the checkpoint never trained on (a model trained by ``bench_sanity.py --families`` on the
others, its items written by ``dyntrm data synth --families``) measures what TTT is for, teaching a new rule;
``--ladder-name`` names that set in the table.

``--quick``: without ``--checkpoint``, trains a `debug` model for a minute on a small ladder it writes, then runs
the same table on 12 held-out ladder tasks and 4 ARC tasks with 4 TTT steps: a smoke run of a couple of minutes.
Writes BENCHMARKS.md section "ttt" unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, finish, table  # noqa: E402

from dyntrm.checkpoint import load_model  # noqa: E402
from dyntrm.config import apply_overrides, preset  # noqa: E402
from dyntrm.data.arc import filter_max_side, load_source  # noqa: E402
from dyntrm.cli import demo_config  # noqa: E402
from dyntrm.data.dataset import eval_items, split_items  # noqa: E402
from dyntrm.data.synth import FAMILIES, family_of, write_ladder  # noqa: E402
from dyntrm.evaluate import evaluate_items, metrics_of  # noqa: E402
from dyntrm.joint import fine_tune_on_demos  # noqa: E402
from dyntrm.runtime import pick_device  # noqa: E402
from dyntrm.scoring import attempts, paired_gain, rerank, vote  # noqa: E402
from dyntrm.train import train  # noqa: E402
from dyntrm.ttt import MODES, PARAM_SETS, SIZES, TTT  # noqa: E402

QUICK_FAMILIES = ("identity", "mirror", "recolour", "transpose")


def quick_checkpoint(out: Path) -> tuple[Path, Path]:
    """A small ladder and a `debug` model trained on its training split for about a minute."""
    ladder = out / "ladder"
    if not (ladder / "evaluation").exists():
        write_ladder(ladder, QUICK_FAMILIES, 30, 3, (3, 5), seed=0)
    run = out / "run"
    cfg = apply_overrides(preset("debug"), [
        f"data.source={ladder}", "data.train_splits=train", "data.demo_splits=", "data.eval_split=eval",
        "train.time_budget_s=60", "train.steps=100000", "train.warmup=10", "train.lr=3e-3", "train.log_every=25",
        "train.save_every=0", "train.ema_decay=0.9"])
    train(cfg, run, live=False, overwrite=True)  # the benchmark's own scratch run: a rerun replaces it
    return run, ladder


def ranked_as(results, mode: str):
    """The same results with their candidates ordered by ``mode`` (their likelihoods are already computed)."""
    out = []
    for r in results:
        ranked = rerank(r.ranked, mode)
        out.append(replace(r, ranked=ranked, attempts=attempts(ranked)))
    return out


def run_mode(model, items, ttt: TTT | None, args, max_len: int, cap: bool) -> dict:
    t0 = time.perf_counter()
    results, stats = evaluate_items(model, items, n_views=args.views, seed=args.seed, ttt=ttt, rank="likelihood",
                                    max_len=max_len, cap_to_prompt=cap)
    return {"seconds": time.perf_counter() - t0, **row_of(results, stats, ("votes", "likelihood", "both"))}


def pooled(base: dict, adapted: dict) -> dict:
    """The row of ``adapted``'s TTT setting with the checkpoint's own candidates pooled into every vote: each test
    input's candidates are the checkpoint's (``base``, the same items and views) and the adapted copies', voted
    together (by votes only: the likelihoods were taken by different models)."""
    results = []
    for b, a in zip(base["_results"], adapted["_results"], strict=True):
        assert b.item.task_id == a.item.task_id and b.item.index == a.item.index
        ranked = vote(b.candidates + a.candidates)
        results.append(replace(a, ranked=ranked, candidates=b.candidates + a.candidates, steps=b.steps + a.steps,
                               attempts=attempts(ranked, fallback=a.item.input)))
    row = {k: v for k, v in adapted.items() if not k.startswith("pass@2") and not k.startswith("_")}
    row.update(row_of(results, adapted["_stats"], ("votes",)))
    row.update({"mode": adapted["mode"] + " + checkpoint", "pass@2 likelihood": None, "pass@2 both": None,
                "ttt_seconds_per_task": adapted["ttt_seconds_per_task"]})  # a joint fine-tune's share included
    return row


def settings(args, model, ckpt, cfg, set_name: str, items):
    """The rows of one set, in order: (label, model, TTT parameters or "none", copies, joint seconds per task). The
    checkpoint's rows first; with ``--joint-minutes`` the fine-tune runs only once they are measured (this is a
    generator), and its rows follow."""
    yield "none", model, "none", args.copies[0], 0.0
    yield from ((w, model, w, c, 0.0) for w in args.params for c in args.copies)
    if args.joint_minutes:
        slug = re.sub(r"[^a-z0-9]+", "-", set_name.lower()).strip("-")
        joint, _, seconds = fine_tune_on_demos(ckpt, cfg, items, Path(args.out) / f"joint-{slug}",
                                               minutes=args.joint_minutes, lr=args.joint_lr)
        share = seconds / len({i.task_id for i in items})
        yield "joint", joint, "none", args.copies[0], share
        yield from ((f"joint + {w}", joint, w, args.copies[0], share) for w in args.params)


def row_of(results, stats: dict, modes: tuple[str, ...]) -> dict:
    """A table row: pass@2 under each ranking in ``modes`` (votes first), attempt 1's diagnostics, halting, TTT."""
    row = {"ttt_seconds_per_task": stats.get("ttt_seconds_per_task"),
           "loss_first": stats.get("ttt_loss_first"), "loss_last": stats.get("ttt_loss_last"),
           "too_long": stats["too_long"], "prompts_shortened": stats["prompts_shortened"],
           "single_demo_tasks": stats.get("ttt_single_demo_tasks", 0), "_results": results, "_stats": stats,
           "families": {}}
    for mode in modes:
        m = metrics_of(ranked_as(results, mode), stats)
        row[f"pass@2 {mode}"] = m["pass@2"]
        if mode == "votes":  # per-task scores, for the gain's bootstrap interval
            row["_per_task"] = {tid: t["pass@2"] for tid, t in m["tasks"].items()}
        if mode == modes[-1]:  # per ladder family (tasks named FAMILY-INDEX), pass@2 under the default ranking
            fam: dict[str, list[float]] = {}
            for tid, task in m["tasks"].items():
                fam.setdefault(family_of(tid), []).append(task["pass@2"])
            ladder = len(fam) > 1 and all(f in FAMILIES for f in fam)  # ARC ids are not FAMILY-INDEX
            row["families"] = {f: float(np.mean(v)) for f, v in fam.items()} if ladder else {}
        if mode == "votes":
            row.update({"shape@1": m["shape@1"], "cells@1": m["cells@1"]})  # attempt 1's partial credit
            tests = [t for task in m["tasks"].values() for t in task["tests"]]
            solved = [t["mean_steps"] for t in tests if t["solved@2"]]
            row.update({"pass@1 votes": m["pass@1"], "halt_all": m["mean_steps"],
                        "halt_solved": float(np.mean(solved)) if solved else float("nan"),
                        "_halts": {(tid, t["index"]): (t["mean_steps"], t["solved@2"])
                                   for tid, task in m["tasks"].items() for t in task["tests"]}})
    return row


def paired_halting(base: dict, row: dict) -> tuple[float, float] | None:
    """The mean halting step on the test inputs ``row`` solves (pass@2, votes): without TTT (``base``) and under
    ``row``'s setting, on the same inputs; None where it solves none. The ACT goal: it falls after TTT."""
    keys = [k for k, (_, ok) in row["_halts"].items() if ok]
    if not keys:
        return None
    return float(np.mean([base["_halts"][k][0] for k in keys])), float(np.mean([row["_halts"][k][0] for k in keys]))


def item_sets(args) -> dict[str, list]:
    sets = {}
    if args.ladder:
        tasks = load_source(args.ladder).split("eval")
        if args.ladder_per_family or args.skip:  # N held-out tasks of every family, after the first --skip
            by_family: dict[str, list] = {}
            for t in tasks:
                by_family.setdefault(family_of(t.id), []).append(t)
            end = args.skip + args.ladder_per_family if args.ladder_per_family else None
            tasks = [t for ts in by_family.values() for t in ts[args.skip:end]]
        sets[args.ladder_name] = eval_items(tasks)
    if args.limit:
        tasks = filter_max_side(load_source("arc1").split("eval"), 10)[args.skip:args.skip + args.limit]
        sets["ARC-AGI-1 eval <= 10x10"] = eval_items(tasks)
    if args.demo_set:  # what `make demo` scores: the held-out test inputs of the tasks it trains on
        cfg = demo_config(0)
        sets["demo (ARC-AGI-1 train <= 8x8, test inputs)"] = split_items(cfg, max_side=cfg.data.max_side)
    return sets


def render(rows: list[dict], args, name: str, sizes: dict[str, str]) -> str:
    head = ["items", "TTT", "pass@2 votes", "gain over none, votes [95% CI]", "pass@2 likelihood", "pass@2 both",
            "right shape", "cells right", "TTT s / task",
            "LOO loss first -> last",
            "halting step all / solved", "halting on its solved: none -> it", "routing's share of the gain"]
    several = len(args.copies) > 1
    if several:
        head[2:2] = ["copies"]
        head.append(f"TTT speed vs {args.copies[0]} copies")
    body = []
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        loss = "-" if r["loss_first"] is None else f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        secs = "-" if r["ttt_seconds_per_task"] is None else f"{r['ttt_seconds_per_task']:.1f}"
        gain = "" if "gain" not in r else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*r["gain"])
        paired = "-" if r.get("halt_paired") is None else "{:.2f} -> {:.2f}".format(*r["halt_paired"])
        body.append([r["set"], r["mode"], *([str(r["copies"])] if several else []), f"{r['pass@2 votes']:.3f}",
                     gain, fmt(r["pass@2 likelihood"]), fmt(r["pass@2 both"]), f"{r['shape@1']:.3f}",
                     f"{r['cells@1']:.3f}", secs, loss, f"{r['halt_all']:.2f} / {r['halt_solved']:.2f}",
                     paired, r.get("recovered", ""), *([r.get("speedup", "")] if several else [])])
    sets = "; ".join(f"{s}: {n}" for s, n in sizes.items())
    extras = "".join(text for on, text in (
        (args.colours, ", colours 1-9 permuted afresh in every sequence (--colours)"),
        (args.keep_shape, ", the shape tokens out of the TTT loss (--keep-shape)"),
        (args.sizes == "checkpoint", ", sizes written by the checkpoint, cells by the copy (--sizes checkpoint)"),
        (args.joint_minutes, f"; joint: {args.joint_minutes:g} min on the demonstrations of all the set's tasks "
                             f"together at lr {args.joint_lr:g} (`dyntrm train --init`), its time shared out over "
                             f"the tasks in TTT s / task"),
    ) if on)
    return (f"Checkpoint `{name}`; {sets}; {args.views} views; TTT: {args.steps} steps of "
            f"{args.batch} leave-one-out sequences, lr {args.lr:g} (routing {args.lr_routing or args.lr:g}, "
            f"norms {args.lr_norms or args.lr:g}), constant, fresh AdamW per "
            f"{'task' if args.mode == 'task' else 'task and view (--mode view: adapted in the view frame)'}{extras}. "
            f"pass@2 is ARC's metric, under three orders of the same candidates: votes; total log-likelihood over the "
            f"views; votes, then likelihood. Halting: mean ACT step of every answer / of the answers solved (pass@2, "
            f"votes); on its solved: the mean halting step on the test inputs the row solves, without TTT -> with it. "
            f"Right shape, cells right: attempt 1 (votes) of the right size, and its share of right cells "
            f"(0 where the size is wrong). Routing's share: (routing - none) / (all - none) of pass@2 (votes). Gain: "
            f"pass@2 (votes) less no TTT's on the same tasks, with a 95% paired bootstrap interval over tasks "
            f"(`scoring.paired_gain`). `X + checkpoint`: the checkpoint's candidates pooled into X's votes.\n\n"
            + table(head, body) + family_table(rows))


def family_table(rows: list[dict]) -> str:
    """pass@2 (votes, then likelihood) per ladder family and TTT setting; empty for sets of one family."""
    fams = sorted({f for r in rows for f in r.get("families", {})})
    if not fams:
        return ""
    body = [[r["set"], r["mode"], *(f"{r['families'][f]:.2f}" if f in r.get("families", {}) else "-" for f in fams)]
            for r in rows if r.get("families")]
    return "\n\npass@2 (both; votes for a pooled row) per family:\n\n" + table(["items", "TTT", *fams], body)


def main() -> None:
    ap = arguments(__doc__, quick="train a debug model on a small ladder and run a smoke-sized table")
    ap.add_argument("--checkpoint", default=None, help="run directory or checkpoint (required without --quick)")
    ap.add_argument("--ladder", default=None, help="a ladder directory from `dyntrm data synth` (its evaluation/)")
    ap.add_argument("--ladder-name", default="ladder (held out)",
                    help="the ladder set's name in the table (e.g. for a ladder of families the model never saw)")
    ap.add_argument("--ladder-per-family", type=int, default=0,
                    help="only the first N held-out ladder tasks of each family (0: all)")
    ap.add_argument("--limit", type=int, default=40, help="ARC-AGI-1 evaluation tasks with grids <= 10x10 (0: none)")
    ap.add_argument("--demo-set", action="store_true",
                    help="also the items `make demo` scores (for a checkpoint the demo trained)")
    ap.add_argument("--params", nargs="+", choices=PARAM_SETS, default=list(PARAM_SETS),
                    help="which TTT parameter sets to compare with no TTT")
    ap.add_argument("--steps", type=int, default=16, help="TTT steps per task")
    ap.add_argument("--batch", type=int, default=4, help="leave-one-out sequences per TTT step")
    ap.add_argument("--lr", type=float, default=1e-3, help="TTT learning rate")
    ap.add_argument("--lr-routing", type=float, default=None, help="routing-only TTT's learning rate, the routers' own "
                    "(default --lr)")
    ap.add_argument("--lr-norms", type=float, default=None, help="norms-only TTT's learning rate (default --lr)")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--mode", choices=MODES, default="view",
                    help="task: one adapted copy per task; view: one per decoding view, in its frame (--ttt-mode)")
    ap.add_argument("--colours", action=argparse.BooleanOptionalAction, default=True,
                    help="view mode: colours 1-9 permuted afresh in every leave-one-out sequence (--ttt-colours; "
                         "default on; sections before 2026-11-29 ran without: --no-colours --sizes copy)")
    ap.add_argument("--sizes", choices=SIZES, default="checkpoint",
                    help="who writes the answers' size headers under TTT: the copy or the checkpoint (--ttt-sizes)")
    ap.add_argument("--keep-shape", action="store_true",
                    help="the shape's tokens (size header, ROW, END) leave the TTT loss (--ttt-keep-shape; "
                         "measured: the size drifts)")
    ap.add_argument("--copies", type=int, nargs="+", default=[1],
                    help="copies adapted side by side (--ttt-copies); several values: each TTT setting once per "
                         "value, with its TTT speed against the first")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first S tasks of the ladder (of each family) and of ARC: a slice disjoint "
                         "from the default one, to choose settings on before they are measured on the default slice")
    ap.add_argument("--pool", action="store_true",
                    help="beside each TTT setting, a row with the checkpoint's candidates pooled into its votes")
    ap.add_argument("--joint-minutes", type=float, default=0.0,
                    help="also: the checkpoint fine-tuned this long on all the set's demonstrations together "
                         "(`dyntrm train --init`), alone and with each TTT setting after it (0: off)")
    ap.add_argument("--joint-lr", type=float, default=1e-3, help="the joint fine-tune's peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_ttt",
                    help="where --quick writes its ladder and model, and --joint-minutes its fine-tuned runs")
    ap.add_argument("--section", default="ttt", help="BENCHMARKS.md section (one per checkpoint compared)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.views, args.limit = min(args.steps, 4), min(args.views, 2), min(args.limit, 4)
        if args.checkpoint is None:
            run, ladder = quick_checkpoint(Path(args.out))
            args.checkpoint, args.ladder = str(run), args.ladder or str(ladder)
    if args.checkpoint is None:
        ap.error("--checkpoint is required (or --quick to train a debug one)")
    model, cfg, ckpt = load_model(args.checkpoint, device=pick_device())
    cap = not cfg.model.size_header
    sets = item_sets(args)
    sizes = {}
    lrs = {"all": args.lr, "routing": args.lr_routing or args.lr, "norms": args.lr_norms or args.lr}
    rows = []
    for set_name, items in sets.items():
        base = None
        for label, m, which, copies, joint_s in settings(args, model, ckpt, cfg, set_name, items):
            ttt = None if which == "none" else TTT(args.steps, lrs[which], which, args.batch, args.seed, cfg.train,
                                                         mode=args.mode, colours=args.colours,
                                                         shape_loss=not args.keep_shape, sizes=args.sizes,
                                                         copies=copies)
            row = {"set": set_name, "mode": label, "copies": copies,
                   **run_mode(m, items, ttt, args, cfg.data.max_len, cap)}
            if joint_s:  # the joint fine-tune's time, shared out over the set's tasks
                row["ttt_seconds_per_task"] = (row["ttt_seconds_per_task"] or 0.0) + joint_s
            first = next((r for r in rows if r["set"] == set_name and r["mode"] == label), None)
            if which != "none" and first is not None:  # the same setting, fewer copies at a time: the speed-up
                row["speedup"] = f"{first['ttt_seconds_per_task'] / row['ttt_seconds_per_task']:.2f}x"
            base = row if label == "none" else base
            rows.append(row)
            sizes[set_name] = (f"{len(items)} test inputs of {len({i.task_id for i in items})} tasks, "
                               f"{row['prompts_shortened']} prompts shortened and {row['too_long']} too long "
                               f"for max_len "
                               f"{cfg.data.max_len}, "
                               f"{row['single_demo_tasks']} with a single demonstration (no TTT)")
            print(f"[{set_name} | {label} | {copies} copies] pass@2 votes {row['pass@2 votes']:.3f} likelihood "
                  f"{row['pass@2 likelihood']:.3f} both {row['pass@2 both']:.3f}; {row['seconds']:.0f} s", flush=True)
            if args.pool and which != "none":
                rows.append(pooled(base, row))
                print(f"[{set_name} | {rows[-1]['mode']}] pass@2 votes {rows[-1]['pass@2 votes']:.3f}", flush=True)
        tasks = sorted(base["_per_task"])
        for r in rows:
            if r["set"] == set_name and r is not base:
                r["gain"] = paired_gain([base["_per_task"][t] for t in tasks], [r["_per_task"][t] for t in tasks])
                r["halt_paired"] = paired_halting(base, r)
        full = next((r for r in rows if r["set"] == set_name and r["mode"] == "all"), None)
        routing = next((r for r in rows if r["set"] == set_name and r["mode"] == "routing"
                        and r["copies"] == args.copies[0]), None)
        if full is not None and routing is not None:
            gain = full["pass@2 votes"] - base["pass@2 votes"]
            routing["recovered"] = (f"{(routing['pass@2 votes'] - base['pass@2 votes']) / gain:.0%}" if gain > 0
                                    else "no full-TTT gain to recover")
    text = render(rows, args, str(ckpt), sizes)
    keys = ("pass@2 votes", "pass@2 likelihood", "pass@2 both", "ttt_seconds_per_task", "halt_all", "halt_solved")
    figures = {f"{r['set']} | {r['mode']}" + (f" | {r['copies']} copies" if r["copies"] != args.copies[0] else ""):
               {**{k: r[k] for k in keys}, **({"gain_ci95": list(r["gain"])} if "gain" in r else {})}
               for r in rows}
    finish(args.section, text, figures, write=not args.no_write,
           note="The machine's cores may be shared: seconds are indicative." if args.quick else "")


if __name__ == "__main__":
    main()
