"""Command line: ``dyntrm SUBCOMMAND ...`` (also ``python -m dyntrm``).

Errors in the user's input (bad data, bad config, a missing file) are printed as one line without a traceback
and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import ConfigError
from .data.arc import ArcDataError, load_source
from .data.dataset import LeakageError

USER_ERRORS = (ArcDataError, ConfigError, LeakageError, FileNotFoundError)
# Piped output (logs, CI) gets a wide console rather than rich's 80-column default, so tables stay readable.
console = Console() if sys.stdout.isatty() else Console(width=160)


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


def cmd_show(args: argparse.Namespace) -> None:
    from .viz import draw_task

    task = load_source(args.source).find(args.task_id)
    path = draw_task(task, args.out, with_test_outputs=not args.hide_answer)
    console.print(f"task {task.id}: {len(task.train)} training pairs, {len(task.test)} test inputs -> {path}")


# ------------------------------------------------------------------------------------------------ demo

def cmd_demo(args: argparse.Namespace) -> None:
    from .data.stats import source_stats
    from .viz import draw_task

    out = Path(args.out)
    for name in ("arc1", "arc2"):
        src = load_source(name)
        for r in source_stats(src, 2048):
            console.print(f"{name} {r['split']:5s}: {r['tasks']:4d} tasks, {r['train_pairs']:5d} train pairs, "
                          f"{r['test_inputs']:4d} test inputs; length p50 {r['length_p50']}, p90 {r['length_p90']}, "
                          f"max {r['length_max']}; {r['skipped']} over 2048")
        task = src.split("train")[0]
        console.print(f"  drew {draw_task(task, out / f'{name}_{task.id}.png')}")


# ------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyntrm", description="DynTRM: a Dynamic Tiny Recursive Model for ARC-AGI")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect a data source")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    stats = data_sub.add_parser("stats", help="task and pair counts, sequence-length percentiles")
    stats.add_argument("--source", default="arc1", help="arc1, arc2 or a PATH")
    stats.add_argument("--max-len", type=int, default=None, help="also count sequences longer than this")
    stats.set_defaults(func=cmd_data_stats)

    show = sub.add_parser("show", help="draw one task's pairs in the ARC palette")
    show.add_argument("source", help="arc1, arc2, a task directory or a task file")
    show.add_argument("task_id")
    show.add_argument("--out", default="task.png")
    show.add_argument("--hide-answer", action="store_true", help="leave test outputs blank")
    show.set_defaults(func=cmd_show)

    demo = sub.add_parser("demo", help="the main job of `make demo`")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
