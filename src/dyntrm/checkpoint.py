"""Checkpoints: atomic save, exact resume, and loads that never unpickle arbitrary objects.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNNN/`` with

- ``model.safetensors``: the raw model's weights (never ``module.`` / ``_orig_mod.`` prefixes);
- ``ema.safetensors``: the weight EMA used for evaluation (when enabled);
- ``state.pt``: optimizer state, RNG states and extra tensors, read back with ``torch.load(weights_only=True)``;
- ``meta.json``: the resolved config, step, data position, counters, git revision and command line.

It is written to a temporary directory that is renamed into place once complete, and only then does the
``latest`` pointer move: a run killed while saving keeps its last good checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from .config import Config, from_dict, to_dict
from .io import _fsync_dir, write_bytes, write_text

CKPT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "meta.json"  # written last inside the temporary directory


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{rev}{'-dirty' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info() -> dict[str, Any]:
    return {"git": git_revision(), "argv": sys.argv, "torch": torch.__version__}


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
         ema_state: dict[str, torch.Tensor] | None, state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write a complete checkpoint atomically and move the ``latest`` pointer to it."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    if (final / COMPLETE).exists():  # this step is saved already (e.g. stopped right after a periodic save):
        write_text(root / LATEST, name + "\n")  # the state is the same, so keep the files and move the pointer
        return final
    tmp = root / f".tmp_{name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Serialised in memory and written by Python: the libraries' own writers turn a full disk into errors
        # that do not say so, Python's carry the errno (ENOSPC) and the file.
        write_bytes(tmp / "model.safetensors", save_tensors(_tensors(model_state)))
        if ema_state is not None:
            write_bytes(tmp / "ema.safetensors", save_tensors(_tensors(ema_state)))
        buf = io.BytesIO()
        torch.save(state, buf)
        write_bytes(tmp / "state.pt", buf.getbuffer())
        write_bytes(tmp / COMPLETE, (json.dumps({**meta, "step": step}, indent=2) + "\n").encode())
        if final.exists():  # an incomplete leftover of a crashed save
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (the ``latest`` pointer, else the newest complete directory)."""
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if pointer.exists():
        d = root / pointer.read_text().strip()
        if (d / COMPLETE).exists():
            return d
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists())
    return done[-1] if done else None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint or a run directory."""
    p = Path(path)
    if (p / COMPLETE).exists():
        return p
    found = latest(p)
    if found is None:
        raise CheckpointError(f"{p}: no complete checkpoint (expected {p}/{CKPT_DIR}/step_*/{COMPLETE})")
    return found


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects."""
    d = resolve(path)
    meta = json.loads((d / COMPLETE).read_text())
    out: dict[str, Any] = {"dir": d, "meta": meta, "model": load_file(str(d / "model.safetensors"))}
    out["ema"] = load_file(str(d / "ema.safetensors")) if (d / "ema.safetensors").exists() else None
    out["state"] = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    return out


def config_of(ckpt: dict[str, Any]) -> Config:
    return from_dict(ckpt["meta"]["config"])


def load_model(path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "cpu"):
    """The model of a checkpoint or run, with EMA weights when present. Returns (model, config, checkpoint dir)."""
    from .model import ArcTransformer

    ckpt = load(path)
    cfg = config_of(ckpt)
    model = ArcTransformer(cfg.model)
    weights = ckpt["ema"] if (use_ema and ckpt["ema"] is not None) else ckpt["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, ckpt["dir"]


def meta_for(cfg: Config, **extra: Any) -> dict[str, Any]:
    return {"config": to_dict(cfg), **run_info(), **extra}
