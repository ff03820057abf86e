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
