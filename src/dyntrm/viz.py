"""Pictures: ARC grids in the standard palette, tasks, training curves and expert usage (read from a run's
metrics.jsonl), routing maps per recursion step and module, the halting decision.

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
from .io import atomic_path, read_metrics  # noqa: E402
from .model.context import ATTN_CHANNELS, CHANNELS, Routed  # noqa: E402

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
    return [save_figure(fig, out_dir / "curves.png"), *plot_usage(run_dir, out_dir)]


# ------------------------------------------------------------------------------------------------ routing

class RoutingRecorder:
    """A model tap that keeps each (step, module)'s routing weights of a single sequence: attention as
    (T, heads, E) per q/k/v, the FFN as (T, E)."""

    def __init__(self, n_heads: int):
        self.n_heads = n_heads
        self.weights: dict[tuple[int, str], np.ndarray] = {}

    def __call__(self, r: Routed) -> None:
        w_NCE = r.weights.detach().float().cpu()
        for c, ch in enumerate(r.names):
            w_NE = w_NCE[:, c]
            # attention rows are (token, head) pairs
            self.weights[(r.step, ch)] = (w_NE.reshape(-1, self.n_heads, w_NE.shape[-1]) if ch in ATTN_CHANNELS
                                          else w_NE).numpy()

    @property
    def steps(self) -> int:
        return 1 + max(s for s, _ in self.weights) if self.weights else 0


def plot_routing(rec: RoutingRecorder, out_dir: str | os.PathLike, title: str = "",
                 segments: Sequence[tuple[int, int, str]] = ()) -> list[Path]:
    """routing.png: per step (rows) and module (q, k, v, ffn), the mean routing weight of every expert (per head
    for attention); ffn_tokens.png: per step, each token's strongest FFN expert."""
    out_dir = Path(out_dir)
    S = rec.steps
    fig, axes = plt.subplots(S, 4, figsize=(16, 1.6 * S + 1), squeeze=False)
    for s in range(S):
        for c, name in enumerate(CHANNELS):
            ax = axes[s][c]
            w = rec.weights.get((s, name))
            if w is None:
                ax.axis("off")
                continue
            m = w.mean(0) if w.ndim == 3 else w.mean(0, keepdims=True)  # (H, E) or (1, E)
            ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(m.shape[0]))
            ax.set_yticklabels([f"h{h}" for h in range(m.shape[0])] if name != "ffn" else ["ffn"], fontsize=6)
            ax.set_xticks([])
            if s == 0:
                ax.set_title(f"{name}: mean weight per expert", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"step {s + 1}", fontsize=9)
    fig.suptitle(title or "routing per recursion step")
    fig.tight_layout()
    paths = [save_figure(fig, out_dir / "routing.png")]

    ffn = [rec.weights[(s, "ffn")] for s in range(S) if (s, "ffn") in rec.weights]
    if ffn:
        top = np.stack([np.where(w.max(1) > 0, w.argmax(1), -1) for w in ffn])  # (S, T); -1: no expert active
        fig, ax = plt.subplots(figsize=(min(30, 4 + top.shape[1] / 25), 1 + 0.4 * len(ffn)))
        n_e = ffn[0].shape[1]
        cmap = matplotlib.colormaps["tab20"].resampled(n_e + 1)
        ax.imshow(top + 1, aspect="auto", cmap=cmap, vmin=0, vmax=n_e, interpolation="nearest")
        ax.set_yticks(range(len(ffn)))
        ax.set_yticklabels([f"step {s + 1}" for s in range(len(ffn))], fontsize=7)
        for start, end, label in segments:
            ax.axvline(start - 0.5, color="w", linewidth=0.6)
            ax.text((start + end) / 2, -0.7, label, ha="center", fontsize=6)
        ax.set_xlabel("token position (colour: strongest FFN expert; white: none active)")
        paths.append(save_figure(fig, out_dir / "ffn_tokens.png"))
    return paths


def plot_halting(q_halt: np.ndarray, q_continue: np.ndarray, threshold: float, steps: int,
                 path: str | os.PathLike) -> Path:
    p = 1 / (1 + np.exp(-(q_halt - q_continue)))
    fig, ax = plt.subplots(figsize=(5, 3))
    xs = np.arange(1, len(p) + 1)
    ax.plot(xs, p, marker="o")
    ax.axhline(threshold, color="r", linestyle="--", label=f"threshold {threshold:g}")
    ax.axvline(steps, color="k", linestyle=":", label=f"halts after step {steps}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("recursion step")
    ax.set_ylabel("sigmoid(q_halt - q_continue)")
    ax.legend(fontsize=7)
    ax.set_title("halting decision (read at the prompt's end)", fontsize=9)
    return save_figure(fig, path)


def plot_usage(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Expert usage over training: for q, k, v and the FFN (those the model routes: a variant may route one
    library only), the fraction of tokens for which each expert is active at each logged step (heatmaps), and the
    routing entropy. Does specialisation emerge?"""
    train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"
             and any(f"usage_{c}" in r for c in CHANNELS)]
    if not train:
        return []
    out_dir = Path(out_dir or Path(run_dir) / "plots")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    for ax, name in zip(axes.flat, CHANNELS):
        if f"usage_{name}" not in train[0]:
            ax.axis("off")
            ax.set_title(f"{name}: not routed in this variant")
            continue
        u = np.array([r[f"usage_{name}"] for r in train]).T  # (E, logs)
        im = ax.imshow(u, aspect="auto", cmap="magma", interpolation="nearest", vmin=0,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, u.shape[0] - 0.5, -0.5))
        ax.set_title(f"{name}: fraction of tokens using each expert")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.04)
    ax = axes.flat[4]
    for name in CHANNELS:
        ax.plot(steps, [r.get(f"entropy_{name}", np.nan) for r in train], label=name)
    ax.set_title("routing entropy (nats, normalised weights)")
    ax.legend()
    ax = axes.flat[5]
    for name in CHANNELS:
        ax.plot(steps, [r.get(f"active_{name}", np.nan) for r in train], label=name)
    ax.set_title("active experts per token")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return [save_figure(fig, out_dir / "usage.png")]
