"""Shared benchmark plumbing: the common options, interleaved timing with medians, the machine's matmul rate,
BENCHMARKS.md sections.

This machine is noisy (shared cores), so candidates are timed in *rounds*: each round runs every candidate once,
in a random order, and each candidate's figure is the median over rounds. Ratios are always taken between
candidates measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def arguments(doc: str, quick: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--no-write`` and, where it has a quick mode (``quick`` says what it is),
    ``--quick``. The description is the first line of the script's docstring ``doc``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    if quick is not None:
        ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    return ap


def rounds(candidates: dict[str, Callable[[], object]], n_rounds: int, warmup: int = 1,
           seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each candidate over ``n_rounds`` interleaved rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    rng = random.Random(seed)
    names = list(candidates)
    for _ in range(n_rounds):
        rng.shuffle(names)
        for k in names:
            t0 = time.perf_counter()
            candidates[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_rate(n: int = 2048, n_rounds: int = 5) -> float:
    """fp32 FLOP/s of an n x n x n matmul on this machine right now (median)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = rounds({"mm": lambda: a @ b}, n_rounds)["mm"]
    return 2 * n ** 3 / t


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with the command, machine, date and body."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"{start}\n```\n{command}\n```\n_{machine()}; {stamp}_\n\n{body.strip()}\n{end}")
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {name}\n\n{block}\n"
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCHMARKS_MD)


def table(header: list[str], rows: list[list[object]]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def final_json(figures: dict) -> None:
    """The last line of every benchmark: its figures as one JSON object."""
    print(json.dumps(figures, sort_keys=True), flush=True)


def finish(section: str, text: str, figures: dict, *, write: bool, note: str = "") -> None:
    """Print the table, record it in BENCHMARKS.md (unless told not to), end with the JSON line."""
    print(text)
    if write:
        write_section(section, command_line(), text + (f"\n\n{note}" if note else ""))
    final_json(figures)


def command_line() -> str:
    """The command that ran, quoted so that it can be pasted back into a shell."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
