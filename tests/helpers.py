"""Shared test set-up: the tiny hand-made tasks and a `debug` config that trains on them in seconds."""

from pathlib import Path

import torch

from dyntrm.config import apply_overrides, preset
from dyntrm.runtime import Runtime

ASSETS = Path(__file__).parent / "assets"
TASKS = ASSETS / "tasks"
CPU = Runtime(torch.device("cpu"))


def debug_cfg(*overrides: str):
    """`debug` on tests/assets/tasks: their demonstrations train, their test inputs are scored."""
    cfg = preset("debug")
    return apply_overrides(cfg, [
        f"data.source={TASKS}", "data.train_splits=", "data.demo_splits=all", "data.eval_split=all",
        "data.tokens_per_batch=512", "data.max_len=512", "train.steps=6", "train.warmup=2", "train.log_every=1",
        "train.save_every=0", "train.lr=3e-3", *overrides,
    ])


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
