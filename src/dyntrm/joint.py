"""Joint test-time training (issue 12): the checkpoint fine-tuned on the demonstrations of every task it is about to
answer, all together, before any per-task test-time training (``ttt.py``).

This is the transductive step of TRM's protocol (which trains on the evaluation tasks' demonstrations beside the
training set), taken after training instead of during it, and the single fine-tune the 2024 ARC Prize leaders ran
on the whole test set. The tasks are written out as one ARC task bundle holding their demonstrations and their test
inputs *without outputs*, and trained on as demonstrations only (``data.demo_splits``): a test output cannot
enter, whatever the items carry. The run is `dyntrm train --init CHECKPOINT` on that directory, with the
checkpoint's recipe, a time budget and a fresh schedule at ``lr``; its EMA weights answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Config, ConfigError, apply_overrides
from .data.dataset import EvalItem
from .io import write_json


def check_options(minutes: float, lr: float) -> None:
    """``--ttt-joint-minutes`` and ``--ttt-joint-lr`` of a joint run, checked before anything is loaded."""
    if not minutes > 0:
        raise ConfigError(f"--ttt-joint-minutes {minutes:g}: must be > 0 (or 0 on the command line: off)")
    if not lr > 0:
        raise ConfigError(f"--ttt-joint-lr {lr:g}: must be > 0")


def write_demo_tasks(items: Sequence[EvalItem], path: Path) -> None:
    """Every task of ``items`` into one task bundle ``{task id: task}`` at ``path`` (any id is a key, none a file
    name): its demonstrations and its test inputs, no test output."""
    tasks: dict[str, tuple] = {}
    for it in items:
        tasks.setdefault(it.task_id, (it.demos, []))[1].append(it.input)
    grid = lambda g: np.asarray(g).tolist()  # noqa: E731
    write_json(path, {tid: {"train": [{"input": grid(p.input), "output": grid(p.output)} for p in demos],
                            "test": [{"input": grid(g)} for g in inputs]} for tid, (demos, inputs) in tasks.items()},
               indent=None)


def fine_tune_on_demos(checkpoint: str | Path, cfg: Config, items: Sequence[EvalItem], out: str | Path, *,
                       minutes: float, lr: float = 1e-3, live: bool | None = False):
    """Fine-tune ``checkpoint`` (whose config is ``cfg``) for ``minutes`` on the demonstrations of ``items``' tasks
    together; the run lives in ``out/run`` (replaced if there), the tasks in ``out/demonstrations.json``. The run is
    scheduled by time (the budget), whatever the checkpoint's ``train.steps``. Returns the fine-tuned model (EMA
    weights, eval mode), its config and the seconds taken."""
    from .checkpoint import load_model
    from .runtime import pick_device
    from .train import train

    check_options(minutes, lr)
    out = Path(out)
    tasks = out / "demonstrations.json"
    write_demo_tasks(items, tasks)
    ft = apply_overrides(cfg, [
        f"train.init={Path(checkpoint).resolve()}", f"data.source={tasks}", "data.train_splits=",
        "data.demo_splits=all", "data.eval_split=all", "data.max_side=30", f"train.time_budget_s={minutes * 60:g}",
        "train.steps=1000000", f"train.lr={lr:g}", "train.save_every=0", "train.eval_every=0", "train.log_every=100"])
    t0 = time.perf_counter()
    train(ft, out / "run", live=live, overwrite=True)
    seconds = time.perf_counter() - t0
    model, ft_cfg, _ = load_model(out / "run", device=pick_device())
    return model, ft_cfg, seconds
