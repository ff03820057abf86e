"""Pictures: ARC grids in the standard palette, tasks, and (later) routing maps and curves.

Everything renders with matplotlib's Agg backend (no screen needed) and writes files atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .data.arc import Task  # noqa: E402
from .io import atomic_path  # noqa: E402

# The standard ARC palette: black, blue, red, green, yellow, grey, magenta, orange, sky, maroon.
ARC_COLOURS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00",
               "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25"]
ARC_CMAP = ListedColormap(ARC_COLOURS)


def draw_grid(ax, grid: np.ndarray | None, title: str = "") -> None:
    """One grid with thin grey cell borders; ``None`` draws an empty 'unknown' panel."""
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    if grid is None:
        ax.text(0.5, 0.5, "?", ha="center", va="center", fontsize=16, transform=ax.transAxes)
        return
    h, w = grid.shape
    ax.imshow(grid, cmap=ARC_CMAP, vmin=0, vmax=9, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.5)
    ax.tick_params(which="minor", length=0)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def draw_pairs(rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray | None]]]], path: str | os.PathLike,
               title: str = "") -> Path:
    """A figure with one row per entry: ``(row label, [(panel title, grid), ...])``."""
    n_cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.2 * n_cols, 2.2 * len(rows)), squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if c < len(panels):
                name, grid = panels[c]
                draw_grid(ax, grid, f"{label} {name}".strip())
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def draw_task(task: Task, path: str | os.PathLike, *, with_test_outputs: bool = True) -> Path:
    """Every pair of a task: demonstrations, then test inputs (and their outputs when known)."""
    rows = [(f"train[{i}]", [("input", p.input), ("output", p.output)]) for i, p in enumerate(task.train)]
    rows += [(f"test[{i}]", [("input", p.input), ("output", p.output if with_test_outputs else None)])
             for i, p in enumerate(task.test)]
    return draw_pairs(rows, path, title=f"task {task.id}")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is this a run directory?)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:  # a run killed mid-line leaves a partial last line
                if n < len(path.read_text().splitlines()):
                    raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    return out


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Curves of the loss parts, tokens/s, active experts and halting steps (and evaluations) of a run."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no training records yet")
    out_dir = Path(out_dir or Path(run_dir) / "plots")
    steps = [r["step"] for r in train]
    series = lambda k: [r.get(k, float("nan")) for r in train]  # noqa: E731
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0][0]
    for k in ("loss", "lm", "lm_first", "lm_last"):
        ax.plot(steps, series(k), label=k)
    ax.set_yscale("log")
    ax.set_title("LM loss (first / last recursion step)")
    ax.legend()
    ax = axes[0][1]
    for k in ("act_halt", "act_continue", "l1"):
        ax.plot(steps, series(k), label=k)
    ax.set_title("ACT losses and L1 (mean Σw)")
    ax.legend()
    ax = axes[0][2]
    ax.plot(steps, series("acc_last"), label="token accuracy (last step)")
    ax.plot(steps, series("solved_last"), label="answers exact (last step, teacher-forced)")
    for r in evals:
        ax.scatter([r["step"]], [r["pass@2"]], color="k", marker="x")
    if evals:
        ax.scatter([], [], color="k", marker="x", label="eval pass@2")
    ax.set_title("accuracy")
    ax.legend()
    axes[1][0].plot(steps, series("tok_per_s"))
    axes[1][0].set_title("training tokens / s")
    axes[1][1].plot(steps, series("active_experts"))
    axes[1][1].set_title("active FFN experts per token")
    axes[1][2].plot(steps, series("halt_step"))
    axes[1][2].set_title("mean halting step (inference rule)")
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    return [save_figure(fig, out_dir / "curves.png")]
