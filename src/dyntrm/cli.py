"""Command line: ``dyntrm SUBCOMMAND ...`` (also ``python -m dyntrm``).

Errors in the user's input (bad data, bad config, a missing file) are printed as one line on stderr without a
traceback and exit with code 2.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import MAX_ANSWER_TOKENS, ConfigError
from .data.arc import ArcDataError, load_source
from .data.dataset import LeakageError
from .rundir import RunDirError
from .train import TrainingStopped as TrainingStoppedError

# A failed file operation (a missing file, a full disk, a read-only directory) is the user's environment, not a bug.
USER_ERRORS = (ArcDataError, ConfigError, LeakageError, RunDirError, OSError)

# Piped output (logs, CI) gets a wide console rather than rich's 80-column default, so tables stay readable; lines
# are never broken (soft_wrap), so that a result line stays one line for whoever reads it.
console = Console(soft_wrap=True) if sys.stdout.isatty() else Console(width=160, soft_wrap=True)
# Errors and warnings go to stderr, so that a script reading stdout (or a file it was redirected to) never takes
# them for results.
errors = Console(stderr=True)


# ------------------------------------------------------------------------------------------------ data

def cmd_data_stats(args: argparse.Namespace) -> None:
    from .data.stats import PERCENTILES, source_stats

    src = load_source(args.source)
    rows = source_stats(src, args.max_len)
    table = Table(title=f"{src.name}: tokens per sequence (demonstrations + one test pair)")
    heads = {"split": "split", "tasks": "tasks", "train_pairs": "demos", "test_inputs": "tests",
             "max_side_le10": "<=10x10", "length_min": "min", "length_mean": "mean"}
    heads.update({f"length_p{q}": f"p{q}" for q in PERCENTILES})
    heads["length_max"] = "max"
    if args.max_len is not None:
        heads["skipped"] = f">{args.max_len}"
    for h in heads.values():
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*(f"{r[c]:.0f}" if isinstance(r[c], float) else str(r[c]) for c in heads))
    console.print(table)
    if args.max_len is not None:
        for r in rows:
            console.print(f"{r['split']}: {r['skipped']} of {r['test_inputs']} sequences exceed max_len={args.max_len} "
                          f"and would be skipped")


def cmd_data_synth(args: argparse.Namespace) -> None:
    from .data.synth import parse_sides, write_ladder

    families = [f for f in args.families.split(",") if f]
    try:
        counts = write_ladder(args.out, families, args.tasks, args.eval_tasks, parse_sides(args.sides), args.seed,
                              demos=args.demos)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    console.print(f"{args.out}: {counts['training']} training and {counts['evaluation']} evaluation tasks "
                  f"({', '.join(families)}); train with --source {args.out}")


def cmd_show(args: argparse.Namespace) -> None:
    from .viz import draw_task

    task = load_source(args.source).find(args.task_id)
    path = draw_task(task, args.out, with_test_outputs=not args.hide_answer)
    console.print(f"task {task.id}: {len(task.train)} training pairs, {len(task.test)} test inputs -> {path}")


# ------------------------------------------------------------------------------------------------ model

def cmd_info(args: argparse.Namespace) -> None:
    from .config import apply_overrides, preset
    from .model.info import model_info

    cfg = apply_overrides(preset(args.preset), args.set)
    info = model_info(cfg.model, args.context)
    m = cfg.model
    console.print(f"preset {args.preset}: variant {m.variant}, d_model {m.d_model}, {m.n_heads} heads, "
                  f"N = {m.max_steps}"
                  + (f", {m.attn_experts} attention experts (hidden {m.attn_expert_hidden})" if m.dyn_attn else "")
                  + (f", {m.ffn_experts} FFN experts ({m.ffn_active:g} active)" if m.dyn_ffn else ""))
    table = Table()
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in info.items():
        if k == "context":
            continue
        label = ("FLOPs/token/step: total" if k == "flops_per_token_step"
                 else k.replace("params_", "params: ").replace("flops_", "FLOPs/token/step: "))
        table.add_row(label, f"{v:,.0f}")
    console.print(table)
    console.print(f"FLOPs are forward multiply-adds x 2 per token per recursion step; attention scores at a "
                  f"context of {args.context} tokens. A forward pass costs N = {m.max_steps} steps of this.")


# ------------------------------------------------------------------------------------------------ training

def resolve_config(args: argparse.Namespace):
    """The preset (or a resumed run's config, or the config of the checkpoint --init fine-tunes), then --source,
    then --set overrides, strictly typed."""
    from .config import apply_overrides, load_config, preset

    extra = []
    if getattr(args, "resume", None):
        path = Path(args.resume) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: not a run directory (no config.json)")
        cfg = load_config(path)
    elif getattr(args, "init", None):
        from .checkpoint import load

        ckpt = load(args.init, state=False)  # the very checkpoint, pinned: a run may save a newer one meanwhile
        cfg, extra = ckpt["config"], [f"train.init={ckpt['dir'].resolve()}"]
    else:
        cfg = preset(getattr(args, "preset", None) or "tiny")
    extra += [f"data.source={args.source}"] if getattr(args, "source", None) else []
    return apply_overrides(cfg, extra + list(args.set))


def cmd_train(args: argparse.Namespace) -> None:
    import time

    from .runtime import setup, teardown
    from .train import train

    if args.resume and (args.overwrite or args.init or args.preset or
                        (args.out and Path(args.out) != Path(args.resume))):
        raise ConfigError("--resume RUN_DIR continues that run in place: it takes neither --overwrite, --init, "
                          "--preset nor another --out")
    if args.init and args.preset:
        raise ConfigError("--init CHECKPOINT fine-tunes that checkpoint's model and config: it takes no --preset "
                          "(--set changes the data, the schedule or the loss)")
    cfg = resolve_config(args)
    name = f"{Path(args.init).resolve().name}-ft" if args.init else args.preset or "tiny"
    run_dir = Path(args.resume or args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    rt = setup(cfg.train.threads)  # torchrun-aware: one process per rank
    try:
        trainer, last = train(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite, rt=rt)
    except KeyboardInterrupt:
        rt.print0(f"stopped: continue from the newest checkpoint with `dyntrm train --resume {run_dir}`",
                  file=sys.stderr)
        raise SystemExit(130)
    del trainer  # DDP's reducer must go before its process group, or gloo aborts the process at exit
    teardown()
    rt.print0(f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}; run in {run_dir}")


# ------------------------------------------------------------------------------------------------ evaluation

# Test-time training by default (eval, predict, demo): 2 steps per task and view at lr 1e-3 (0.3-1.2 s per task with
# 4 views), colours permuted, the checkpoint writing the sizes: the demo's checkpoint 0.095 -> 0.129 on its tasks,
# the 45-minute ladder checkpoint 0.525 -> 0.525, ARC-AGI-1 eval <= 10x10 0 -> 0 (BENCHMARKS.md, ttt-demo4-sizes,
# ttt-2steps ladder, ttt-2steps arc): never below no TTT on the three sets measured
DEFAULT_TTT_STEPS = 2


def add_ttt_options(p: argparse.ArgumentParser, steps: int = DEFAULT_TTT_STEPS) -> None:
    """Test-time training and ranking (issue 12), shared by eval, predict and demo."""
    from .scoring import RANKINGS
    from .ttt import MODES, PARAM_SETS, SIZES

    p.add_argument("--ttt-steps", type=int, default=steps,
                   help="fine-tune a copy of the model on each task's demonstrations for this many steps (0: off; "
                        f"default {steps})")
    p.add_argument("--ttt-lr", type=float, default=1e-3, help="test-time training learning rate (constant)")
    p.add_argument("--ttt-params", choices=PARAM_SETS, default="all",
                   help="what test-time training adapts: all, routing (router prototypes and gates), norms")
    p.add_argument("--ttt-batch", type=int, default=4, help="leave-one-out sequences per test-time training step")
    p.add_argument("--ttt-copies", type=int, default=1,
                   help="adapt this many copies (views, tasks) side by side, their weights stacked under "
                        "torch.func.vmap: the same copies as one at a time, in fewer, larger operations (default 1)")
    p.add_argument("--ttt-mode", choices=MODES, default="view",
                   help="view (default): one adapted copy per view a task is decoded under, trained in that view's "
                        "frame, answering that view only; task: one copy per task, trained under random views")
    p.add_argument("--ttt-colours", action=argparse.BooleanOptionalAction, default=True,
                   help="--ttt-mode view: permute colours 1-9 afresh in every leave-one-out sequence (the view's "
                        "frame stays), so a copy cannot fit the demonstrations by their colours alone (default: on)")
    p.add_argument("--ttt-sizes", choices=SIZES, default="checkpoint",
                   help="who writes each answer's size header under TTT: the checkpoint before adaptation (default; "
                        "the adapted copy then writes the cells) or the copy (all of the answer)")
    p.add_argument("--ttt-keep-shape", action="store_true",
                   help="leave the shape's tokens (size header, row separators, END) out of the test-time loss "
                        "(measured worse: the size drifts; BENCHMARKS ttt-colours-keep-shape)")
    p.add_argument("--rank", choices=RANKINGS, default="both",
                   help="order candidates by votes, by log-likelihood summed over the views, or by votes with ties "
                        "broken by likelihood (both; the default: never below votes in BENCHMARKS, section ttt)")


def ttt_of(args: argparse.Namespace):
    """The test-time training settings of the command line (validated before any model is loaded); its
    ``recipe`` is set from the checkpoint's config once that is read."""
    from .ttt import TTT

    return TTT(args.ttt_steps, args.ttt_lr, args.ttt_params, args.ttt_batch, args.seed, mode=args.ttt_mode,
               colours=args.ttt_colours, shape_loss=not args.ttt_keep_shape, sizes=args.ttt_sizes,
               copies=args.ttt_copies)


def ttt_line(m: dict) -> str:
    """What test-time training did, for the console; empty without it."""
    if not m.get("ttt_steps"):
        return ""
    per = " per view" if m.get("ttt_mode") == "view" else ""
    line = (f"; TTT {m['ttt_steps']} steps{per} of {m['ttt_params']} ({m['ttt_trained_numbers']:,} numbers) on "
            f"{m['ttt_tasks']} tasks, {m['ttt_seconds_per_task'] or 0:.1f} s per task")
    if m["ttt_single_demo_tasks"]:
        line += f", {m['ttt_single_demo_tasks']} single-demonstration tasks answered without it"
    return line


def cmd_eval(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .checkpoint import load_model
    from .data.dataset import split_items
    from .evaluate import run_eval, score_line
    from .io import writable_dir
    from .runtime import pick_device

    ttt = ttt_of(args)
    if args.ttt_joint_minutes:
        from .joint import check_options

        check_options(args.ttt_joint_minutes, args.ttt_joint_lr)  # the user's input first, before a model loads
    model, cfg, ckpt_dir = load_model(args.checkpoint, device=pick_device())
    ttt = replace(ttt, recipe=cfg.train)
    if args.source:
        cfg.data.source = args.source
    items = split_items(cfg, args.split, args.limit)
    out = writable_dir(args.out or Path(args.checkpoint) / f"eval-{args.split or cfg.data.eval_split}")
    joint = {}
    if args.ttt_joint_minutes:  # every task's demonstrations together first, then each task's own TTT
        from .joint import fine_tune_on_demos

        console.print(f"joint test-time training: {args.ttt_joint_minutes:g} min on the demonstrations of "
                      f"{len({it.task_id for it in items})} tasks -> {out / 'joint'}")
        model, _, seconds = fine_tune_on_demos(ckpt_dir, cfg, items, out / "joint", minutes=args.ttt_joint_minutes,
                                               lr=args.ttt_joint_lr, live=None)
        joint = {"ttt_joint_minutes": args.ttt_joint_minutes, "ttt_joint_lr": args.ttt_joint_lr,
                 "ttt_joint_seconds": seconds}
    m, _ = run_eval(model, items, out, n_views=args.views, seed=args.seed, title=f"dyntrm eval: {ckpt_dir}",
                    extra={"checkpoint": str(ckpt_dir), "source": cfg.data.source,
                           "split": args.split or cfg.data.eval_split, **joint},
                    temperature=args.temperature, top_k=args.top_k, cap_to_prompt=args.cap_to_prompt, ttt=ttt,
                    rank=args.rank)
    console.print(f"{score_line(m)}; {m['n_test_inputs']} test inputs, {args.views} views; "
                  f"mean ACT steps {m['mean_steps']:.2f}; "
                  f"{m['decode_tokens_per_s']:.0f} decode tok/s{ttt_line(m)} -> {out}/report.html")


def cmd_predict(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .checkpoint import load_model
    from .data.arc import load_task_file
    from .data.dataset import eval_items
    from .evaluate import evaluate_items, fit_prompts, metrics_of, prompt_limit, submission_of
    from .io import writable_dir, write_json
    from .runtime import pick_device

    ttt = ttt_of(args)  # the user's input first: it is quicker to check than a model to load
    task = load_task_file(args.task)
    model, cfg, _ = load_model(args.checkpoint, device=pick_device())
    out = Path(args.out or f"{task.id}.answers.json")
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory (--out names the answers file)", str(out))
    writable_dir(out.parent)
    items, limit = eval_items([task]), prompt_limit(model)
    for f in fit_prompts(items, args.views, args.seed, limit, cfg.model.size_header):
        if not f.prompts:  # refused before decoding anything: a stand-in answer would pass for the model's
            raise ConfigError(f"task {task.id} test {f.item.index}: even without demonstrations its prompt is "
                              f"{f.fitted_length} tokens, over the {limit} this model answers "
                              f"(model.max_positions={cfg.model.max_positions} less a 30x30 answer's room)")
        if f.dropped:
            errors.print(f"note: task {task.id} test {f.item.index}: its prompt of {f.length} tokens is over the "
                         f"{limit} this model answers; answered from {len(f.item.demos) - f.dropped} of "
                         f"{len(f.item.demos)} demonstrations (the largest left out)", highlight=False,
                         soft_wrap=True, markup=False)
    results, stats = evaluate_items(model, items, n_views=args.views, seed=args.seed,
                                    ttt=replace(ttt, recipe=cfg.train), rank=args.rank)
    write_json(out, submission_of(results), indent=None)
    msg = f"{task.id}: {len(task.test)} test inputs -> {out}"
    if all(p.output is not None for p in task.test):
        msg += f"; pass@2 {metrics_of(results, stats)['pass@2']:.3f}"
    console.print(msg + ttt_line(stats))


def cmd_inspect(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from .checkpoint import load_model
    from .data.dataset import eval_items
    from .data.tokens import IN, OUT
    from .model.generate import generate
    from .viz import RoutingRecorder, draw_pairs, plot_halting, plot_routing

    model, cfg, ckpt = load_model(args.checkpoint)
    task = load_source(args.source).find(args.task_id)
    items = eval_items([task])
    if not 0 <= args.test < len(items):
        raise ArcDataError(f"test index {args.test} out of range: the task has {len(items)} test inputs",
                           task=task.id)
    item = items[args.test]
    prompt = item.prompt(header=cfg.model.size_header)
    if len(prompt) + MAX_ANSWER_TOKENS > cfg.model.max_positions:
        raise ConfigError(f"task {task.id}: a prompt of {len(prompt)} tokens leaves no room for an answer within "
                          f"model.max_positions={cfg.model.max_positions}")
    gen = generate(model, [prompt.tokens])[0]
    seq = np.concatenate([prompt.tokens, np.array(gen.tokens, dtype=np.int64)])
    rec = RoutingRecorder(cfg.model.n_heads)
    pe = torch.tensor([prompt.prompt_end])
    with torch.no_grad():
        model(torch.from_numpy(seq)[None], prompt_end=pe, halt=True, steps=torch.tensor([gen.steps]), tap=rec)
        full = model(torch.from_numpy(prompt.tokens)[None], prompt_end=pe)  # every step, for the halting curve
    marks = [(i, "in" if t == IN else "out") for i, t in enumerate(seq.tolist()) if t in (IN, OUT)]
    segments = [(start, end, label) for (start, label), (end, _) in zip(marks, marks[1:] + [(len(seq), "")])]
    out = Path(args.out)
    paths = plot_routing(rec, out, title=f"{task.id} test {args.test}: routing per recursion step "
                                         f"({gen.steps} of {cfg.model.max_steps} steps run)", segments=segments)
    paths.append(plot_halting(full.q_halt[:, 0].numpy(), full.q_continue[:, 0].numpy(), cfg.model.halt_threshold,
                              gen.steps, out / "halting.png"))
    paths.append(draw_pairs([("test", [("input", item.input), ("target", item.target), ("prediction", gen.grid)])],
                            out / "answer.png", title=f"{task.id} (checkpoint {ckpt.name})"))
    for p in paths:
        console.print(f"wrote {p}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .viz import plot_run

    for p in plot_run(args.run_dir, args.out):
        console.print(f"wrote {p}")


# ------------------------------------------------------------------------------------------------ demo

def demo_config(minutes: float):
    """The demo: `tiny` on the ARC-AGI-1 training tasks whose grids all fit in 8x8, trained on their
    demonstration pairs (augmented), scored on their held-out test inputs."""
    from .config import apply_overrides, preset

    return apply_overrides(preset("tiny"), [
        "data.source=arc1", "data.train_splits=", "data.demo_splits=train", "data.eval_split=train",
        "data.max_side=8", "data.max_len=1024",  # the recipe is tiny's own: only the data and the clock differ
        f"train.time_budget_s={minutes * 60:g}", "train.steps=100000", "train.log_every=5", "train.save_every=100",
    ])




def cmd_demo(args: argparse.Namespace) -> None:
    import time
    from dataclasses import replace

    from .data.dataset import split_items
    from .evaluate import run_eval, score_line
    from .io import read_metrics
    from .report import ttt_changed, write_report
    from .scoring import solved
    from .train import train
    from .viz import plot_run

    cfg = demo_config(args.minutes)
    ttt = replace(ttt_of(args), recipe=cfg.train)  # a bad --ttt-* option stops the demo before it trains
    out = Path(args.out)
    t0 = time.perf_counter()
    items = split_items(cfg, max_side=cfg.data.max_side)  # the tasks it trains on
    console.print(f"demo: training `tiny` for {args.minutes:g} min on the demonstration pairs of "
                  f"{len({i.task_id for i in items})} ARC-AGI-1 training tasks with grids <= 8x8; "
                  f"their {len(items)} held-out test inputs are scored afterwards")
    tr, last = train(cfg, out, overwrite=True)  # a previous demo's run there is replaced
    train_s = time.perf_counter() - t0
    model = tr.ema_model()
    summary = {"training steps": last["step"], "training minutes": round(train_s / 60, 2),
               "tokens seen": last["tokens_seen"], "tokens / s": round(last["tok_per_s"]),
               "final loss": round(last["loss"], 4), "final LM loss (last step)": round(last["lm_last"], 4)}
    first = next(r for r in read_metrics(out) if r.get("kind") == "train")
    summary["first logged loss"] = round(first["loss"], 4)
    if ttt.steps:
        per = "task and view" if ttt.mode == "view" else "task"
        summary["test-time training (TTT)"] = (f"{ttt.steps} steps of {ttt.params} parameters per {per}, "
                                               f"{ttt.batch} leave-one-out sequences per step, lr {ttt.lr:g}")
    rows = {"pass@2": "pass@2", "pass@1": "pass@1", "shape@1": "answers of the right shape",
            "cells@1": "cells right, diagnostic", "mean_steps": "mean ACT steps"}
    final = without = None
    for views in args.views:
        m, results = run_eval(model, items, out / f"eval-{views}view", n_views=views, seed=args.seed,
                              title=f"demo evaluation, {views} views", rank=args.rank)
        console.print(f"{views} view(s): {score_line(m)}; "
                      f"mean ACT steps {m['mean_steps']:.2f}; {m['decode_tokens_per_s']:.0f} decode tok/s")
        final, without, mt = results, (), None
        if ttt.steps:  # the same items and views, each task answered by its adapted copy
            t1 = time.perf_counter()
            mt, final = run_eval(model, items, out / f"eval-{views}view-ttt", n_views=views, seed=args.seed, ttt=ttt,
                                 title=f"demo evaluation, {views} views, TTT", rank=args.rank, without_ttt=results)
            without = results
            console.print(f"{views} view(s), TTT: {score_line(mt)}; mean ACT steps {mt['mean_steps']:.2f}"
                          f"{ttt_line(mt)}; {(time.perf_counter() - t1) / 60:.1f} min in all")
        for key, label in rows.items():
            value = f"{m[key]:.4f}" if mt is None else f"{m[key]:.4f} without TTT | {mt[key]:.4f} with TTT"
            summary[f"{label} ({views} views)"] = value
        if mt is not None:
            changed = ttt_changed(final, without)
            now = {(r.item.task_id, r.item.index): solved(r.attempts, r.item.target, 2) for r in final}
            was = {k: solved(b.attempts, b.item.target, 2) for k, b in changed.items()}
            gained, lost = sum(now[k] and not w for k, w in was.items()), sum(w and not now[k] for k, w in was.items())
            summary[f"answers TTT changed ({views} views)"] = (f"{len(changed)} of {len(final)}: {gained} newly "
                                                                f"solved, {lost} no longer solved")
            summary[f"TTT seconds per task ({views} views)"] = round(mt["ttt_seconds_per_task"] or 0.0, 2)
    ref = m["reference_copy_input"]  # the same for every view count: it depends on the items only
    ref_line = f"pass@2 {ref['pass@2']:.4f}, right shape {ref['shape@1']:.4f}, cells right {ref['cells@1']:.4f}"
    summary["reference: answering with the test input"] = ref_line
    console.print(f"reference, answering each test input with itself: {ref_line}")
    summary["wall minutes"] = round((time.perf_counter() - t0) / 60, 2)
    curves = plot_run(out)
    path = write_report(out / "report.html", "dyntrm demo", summary=summary, results=final, images=curves,
                        without_ttt=without,
                        notes=f"Model: tiny preset (DynSIHA+ attention, DynMoE FFN, N = {cfg.model.max_steps} "
                              "recursion steps, ACT). Weights: EMA. Test outputs of these tasks were never trained "
                              "on. Test inputs are shown as answered "
                              + ("with test-time training; answers it changed are marked." if ttt.steps
                                 else "by the trained model."))
    console.print(f"report: {path.resolve()}")


# ------------------------------------------------------------------------------------------------ main

class Parser(argparse.ArgumentParser):
    """argparse, with its refusals as one ``error:`` line (like every other user error) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def number(kind: type, lo: float, *, strict: bool = False):
    """An argparse type: a finite ``kind`` (int or float) >= ``lo`` (> ``lo`` when ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or (value <= lo if strict else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo:g}, got {text}")
        return value
    return parse


POSITIVE, NONNEGATIVE = number(int, 1), number(int, 0)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dyntrm", description="DynTRM: a Dynamic Tiny Recursive Model for ARC-AGI")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect a data source")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    stats = data_sub.add_parser("stats", help="task and pair counts, sequence-length percentiles")
    stats.add_argument("--source", default="arc1", help="arc1, arc2 or a PATH")
    stats.add_argument("--max-len", type=POSITIVE, default=None, help="also count sequences longer than this")
    stats.set_defaults(func=cmd_data_stats)
    from .data.synth import FAMILIES

    synth = data_sub.add_parser("synth", help="write procedural ARC tasks of known rules (the sanity ladder)")
    synth.add_argument("--out", required=True, help="directory; training/ and evaluation/ are written in it")
    synth.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated: {', '.join(FAMILIES)}")
    synth.add_argument("--tasks", type=POSITIVE, default=100, help="training tasks per family")
    synth.add_argument("--eval-tasks", type=NONNEGATIVE, default=20, help="held-out evaluation tasks per family")
    synth.add_argument("--sides", default="3-6", help="input grid sides A-B")
    synth.add_argument("--demos", type=POSITIVE, default=3, help="demonstrations per task (one test input each)")
    synth.add_argument("--seed", type=NONNEGATIVE, default=0)
    synth.set_defaults(func=cmd_data_synth)

    show = sub.add_parser("show", help="draw one task's pairs in the ARC palette")
    show.add_argument("source", help="arc1, arc2, a task directory or a task file")
    show.add_argument("task_id")
    show.add_argument("--out", default="task.png")
    show.add_argument("--hide-answer", action="store_true", help="leave test outputs blank")
    show.set_defaults(func=cmd_show)

    tr = sub.add_parser("train", help="train a model (torchrun-aware); --resume continues a run exactly")
    tr.add_argument("--preset", default=None, help="debug, tiny (CPU; the default) or base (GPU)")
    tr.add_argument("--source", default=None, help="arc1, arc2 or a PATH (sets data.source)")
    tr.add_argument("--out", default=None, help="run directory (default runs/PRESET-TIME)")
    tr.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    tr.add_argument("--init", default=None, metavar="CHECKPOINT",
                    help="fine-tune: start from this run's newest (or this) checkpoint's weights and config, with a "
                         "fresh optimizer and schedule (sets train.init; --set changes the data, the schedule or the "
                         "loss; the schedule is the checkpoint's: under its train.time_budget_s it follows time, "
                         "--set train.time_budget_s=0 schedules by train.steps)")
    tr.add_argument("--overwrite", action="store_true",
                    help="--out holds a run: delete its checkpoints, metrics and evaluations and start afresh")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.d_model=256 (unknown keys list the valid ones)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="decode, un-augment, vote; pass@1/pass@2, submission.json, report.html")
    ev.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    ev.add_argument("--source", default=None, help="data source (default: the run's)")
    ev.add_argument("--split", default=None, help="split to score (default: the run's data.eval_split)")
    ev.add_argument("--views", type=POSITIVE, default=8, help="augmented views per test input (1: no voting)")
    ev.add_argument("--limit", type=POSITIVE, default=None, help="score only the first N test inputs")
    ev.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the views' colour permutations")
    ev.add_argument("--temperature", type=number(float, 0), default=0.0, help="> 0 samples instead of greedy decoding")
    ev.add_argument("--top-k", type=NONNEGATIVE, default=0, help="sample from the k most likely tokens")
    ev.add_argument("--cap-to-prompt", action="store_true",
                    help="limit answers to the largest grid side in their prompt (bounds decoding cost; a heuristic)")
    ev.add_argument("--out", default=None, help="output directory (default RUN/eval-SPLIT)")
    add_ttt_options(ev)
    ev.add_argument("--ttt-joint-minutes", type=float, default=0.0,
                    help="before each task's own test-time training, fine-tune the checkpoint this long on the "
                         "demonstrations of every task scored, together (`train --init`; no test output enters; "
                         "the run is kept in OUT/joint; 0: off)")
    ev.add_argument("--ttt-joint-lr", type=float, default=1e-3, help="the joint fine-tune's peak learning rate")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="answers for any task file, in the ARC Prize format")
    pr.add_argument("checkpoint", metavar="CHECKPOINT")
    pr.add_argument("task", metavar="TASK.json")
    pr.add_argument("--views", type=POSITIVE, default=8)
    pr.add_argument("--seed", type=NONNEGATIVE, default=0)
    pr.add_argument("--out", default=None, help="answers file (default TASK_ID.answers.json)")
    add_ttt_options(pr)
    pr.set_defaults(func=cmd_predict)

    ins = sub.add_parser("inspect", help="pictures of one task's routing per step and module, and of halting")
    ins.add_argument("checkpoint", metavar="CHECKPOINT")
    ins.add_argument("source", help="arc1, arc2, a task directory or a task file")
    ins.add_argument("task_id")
    ins.add_argument("--test", type=NONNEGATIVE, default=0, help="which test input of the task")
    ins.add_argument("--out", default="inspect", help="output directory")
    ins.set_defaults(func=cmd_inspect)

    pl = sub.add_parser("plot", help="PNG curves from a run's metrics.jsonl")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="directory for the PNGs (default RUN_DIR/plots)")
    pl.set_defaults(func=cmd_plot)

    info = sub.add_parser("info", help="parameters per library, active parameters, FLOPs per token per step")
    info.add_argument("--preset", default="tiny")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    info.add_argument("--context", type=POSITIVE, default=1024, help="context length for attention-score FLOPs")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="the main job of `make demo`: train tiny, evaluate, write a report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--minutes", type=number(float, 0, strict=True), default=4.0, help="training time budget")
    demo.add_argument("--views", type=POSITIVE, nargs="+", default=[4],
                      help="evaluate with these view counts (e.g. --views 1 8; each view costs a full decode; 4 "
                           "views ranked by votes, then likelihood: pass@2 0.164 against 0.098 with 1 on the "
                           "30-minute demo's model)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the views and of test-time training")
    add_ttt_options(demo)
    demo.set_defaults(func=cmd_demo)
    return p


def say_error(label: str, e: BaseException) -> None:
    """``label: message`` on stderr, as one line; the message is escaped, since file names and pairs such as
    ``train[0]`` would otherwise read as rich markup (and a stray ``[/x]`` would raise). An OSError reads as its
    file and the system's reason, a full disk called so."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror:
        reason = f"disk full ({e.strerror})" if e.errno == errno.ENOSPC else e.strerror
        text = f"{e.filename}: {reason}" if e.filename else reason
    errors.print(f"[bold red]{label}:[/] {escape(text)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        say_error("error", e)
        return 2
    except TrainingStoppedError as e:
        say_error("stopped", e)
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
