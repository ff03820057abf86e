"""Checkpoints: atomic save, exact resume, and loads that never unpickle arbitrary objects.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNNN/`` with

- ``model.safetensors``: the raw model's weights (never ``module.`` / ``_orig_mod.`` prefixes);
- ``ema.safetensors``: the weight EMA used for evaluation (when enabled);
- ``state.pt``: optimizer state, RNG states and extra tensors, read back with ``torch.load(weights_only=True)``;
- ``meta.json``: the resolved config, step, data position, counters, git revision and command line.

It is written to a temporary directory that is renamed into place once complete, and only then does the
``latest`` pointer move: a run killed while saving keeps its last good checkpoint. Loading a run passes over a
newest checkpoint that does not load (a file truncated or corrupted since) for the next one that does, and says so.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from .config import Config, ConfigError, from_dict, to_dict
from .io import _fsync_dir, read_json, write_bytes, write_text

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
        if final.exists():  # a leftover of a crashed save, or a checkpoint that did not load and was passed over
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


def complete(run_dir: str | os.PathLike) -> list[Path]:
    """A run's complete checkpoints, newest first: the ``latest`` pointer's, then the others by step."""
    root = Path(run_dir) / CKPT_DIR
    done = sorted((p for p in root.glob("step_*") if (p / COMPLETE).exists()), reverse=True)
    pointer = root / LATEST
    target = root / pointer.read_text().strip() if pointer.exists() else None
    return sorted(done, key=lambda p: p != target)  # stable: the pointer's first, the rest newest first


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (the ``latest`` pointer, else the newest complete directory)."""
    found = complete(run_dir)
    return found[0] if found else None


class RefusedPickle(CheckpointError):
    """A state.pt holding more than tensors and plain containers: possibly code, never run, never skipped."""


def _weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt ({e})") from None


def _state(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # the unpickler's notes on pickle protocols are no news to a user
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message advises weights_only=False, which would run whatever the file holds
        raise RefusedPickle(f"refusing to unpickle {path}: not a plain tensor checkpoint") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt ({str(e).split('. ')[0]})") from None


def read(d: Path, *, state: bool = True) -> dict[str, Any]:
    """One checkpoint directory, every file read and checked: its meta.json (with a valid config), weights, EMA,
    and with ``state`` the optimizer and RNG state. Raises :class:`CheckpointError` naming the file that fails."""
    path = d / COMPLETE
    meta = read_json(path, lambda what: CheckpointError(f"{path}: {what}"))
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not isinstance(
            meta.get("train_state"), dict):
        raise CheckpointError(f"{path}: not a checkpoint's meta.json (expected an object with config and "
                              f"train_state)")
    try:
        cfg = from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    out: dict[str, Any] = {"dir": d, "meta": meta, "config": cfg, "model": _weights(d / "model.safetensors")}
    out["ema"] = _weights(d / "ema.safetensors") if (d / "ema.safetensors").exists() else None
    if state:
        out["state"] = _state(d / "state.pt")
    return out


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load(path: str | os.PathLike, *, state: bool = True, warn: Callable[[str], None] = warn_stderr
         ) -> dict[str, Any]:
    """Read a checkpoint (a checkpoint directory, or a run's newest complete one) without unpickling arbitrary
    objects; ``state=False`` reads only what evaluation needs (no optimizer state).

    A run's newest checkpoint that does not load (a truncated file, a corrupt meta.json) is passed over for the
    next older one, and ``warn`` says so; with none left, the error names the newest one's failing file. A
    checkpoint named directly is that one or an error. A refused pickle always stops: it may be an attack."""
    p = Path(path)
    if (p / COMPLETE).exists():
        return read(p, state=state)
    found = complete(p)
    if not found:
        raise CheckpointError(f"{p}: no complete checkpoint (expected {p}/{CKPT_DIR}/step_*/{COMPLETE})")
    failures: list[CheckpointError] = []
    for d in found:
        try:
            ckpt = read(d, state=state)
        except RefusedPickle:
            raise
        except CheckpointError as e:
            failures.append(e)
            continue
        if failures:
            warn(f"{failures[0]}; using {d.name}, the newest checkpoint of {p} that loads")
        return ckpt
    older = "no older checkpoint loads either" if len(found) > 1 else f"no other checkpoint in {p}"
    raise CheckpointError(f"{failures[0]}; {older}")


def check_weights(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], file: Path) -> None:
    """Raise :class:`CheckpointError` naming ``file`` unless ``weights`` has the names and shapes of ``expected``
    (weights copied in from a model of another width would otherwise raise PyTorch's many-line error)."""
    odd = sorted(set(expected) ^ set(weights))
    if odd:
        raise CheckpointError(f"{file}: weights of another model: {len(odd)} names differ from its config's "
                              f"model (e.g. {odd[0]})")
    for k, v in expected.items():
        if weights[k].shape != v.shape:
            raise CheckpointError(f"{file}: weights of another model: {k} is {tuple(weights[k].shape)}, the model "
                                  f"of its meta.json config has {tuple(v.shape)}")


def load_model(path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "cpu",
               warn: Callable[[str], None] = warn_stderr):
    """The model of a checkpoint or run, with EMA weights when present. Returns (model, config, checkpoint dir)."""
    from .model import ArcTransformer

    ckpt = load(path, state=False, warn=warn)
    cfg = ckpt["config"]
    model = ArcTransformer(cfg.model)
    name = "ema" if (use_ema and ckpt["ema"] is not None) else "model"
    check_weights(model.state_dict(), ckpt[name], ckpt["dir"] / f"{name}.safetensors")
    model.load_state_dict(ckpt[name])
    return model.to(device).eval(), cfg, ckpt["dir"]


def meta_for(cfg: Config, **extra: Any) -> dict[str, Any]:
    return {"config": to_dict(cfg), **run_info(), **extra}
