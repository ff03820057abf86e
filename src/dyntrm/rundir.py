"""A run directory belongs to one run (issue 15).

Training into a directory that holds a run needs a decision: continue it (``resume``) or start afresh
(``overwrite``: the old run's files are deleted first); without one it is refused, since a new run's weights would
otherwise mix with the old run's checkpoints. While a run trains, ``RUN/.lock`` holds its process id and host:
created atomically, removed at exit; a second writer is refused while that process lives (or runs on another
machine), and a lock whose process is gone (a killed run) is taken over with a word. At every start, what a killed
save left behind is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import CKPT_DIR

LOCK = ".lock"
RUN_FILES = ("config.json", "run.json", "metrics.jsonl", CKPT_DIR)  # what training writes: their presence is a run
DERIVED = ("plots", "eval-*")  # what `dyntrm plot` / `dyntrm eval` write into a run by default: the old weights'


class RunDirError(ValueError):
    """A run directory that this run may not write (it holds another run, another process writes it)."""


def check(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a target that is not a directory, or that holds a run when neither resuming nor overwriting."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: a file, not a run directory")
    if not (resume or overwrite) and any((run_dir / name).exists() for name in RUN_FILES):
        raise RunDirError(f"{run_dir} holds a run already: continue it with `dyntrm train --resume {run_dir}`, "
                          f"or start afresh with --overwrite (deletes its checkpoints, metrics and evaluations)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def lock(run_dir: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold ``RUN/.lock`` while the block runs. A directory created here and left empty is removed again, so a
    run refused before writing anything leaves nothing behind."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    try:
        _take(path, say)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _take(path: Path, say: Callable[[str], None]) -> None:
    here = socket.gethostname()
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # atomic: one creator wins
        except FileExistsError:
            words = path.read_text().split()  # "PID HOST"
            if not words or not words[0].isdigit():  # written by no dyntrm, or by one killed before writing
                raise RunDirError(f"{path} exists and names no process: if no run writes {path.parent}, delete "
                                  f"it") from None
            pid, host = int(words[0]), words[1] if len(words) > 1 else here
            # another machine's process (a shared filesystem) cannot be looked up here: taken as alive
            if host != here or _pid_alive(pid) or attempt:
                raise RunDirError(f"{path.parent} is being written by process {pid} on {host} (lock {path}); wait "
                                  f"for it, or train into another --out (if no such run is going on, delete the "
                                  f"lock)") from None
            say(f"{path}: its process {pid} is gone (a killed run); taking the run over")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {here}\n")
        return


def prepare(run_dir: Path, *, overwrite: bool, say: Callable[[str], None]) -> None:
    """Under the lock, before the run writes: with ``overwrite`` delete the old run's files; always remove the
    leftovers of a killed save (a ``.tmp_step_*`` directory, an atomic write's ``.NAME.*.tmp``)."""
    if overwrite:
        old = [p for pattern in RUN_FILES + DERIVED for p in sorted(run_dir.glob(pattern))]
        _remove(old)
        if old:
            say(f"--overwrite: deleted the old run's {', '.join(p.name for p in old)} in {run_dir}")
    ckpts = run_dir / CKPT_DIR
    leftovers = [*ckpts.glob(".tmp_step_*"), *ckpts.glob(".*.tmp"), *run_dir.glob(".*.tmp")]
    _remove(leftovers)
    if leftovers:
        say(f"removed {len(leftovers)} leftovers of an interrupted write: {', '.join(p.name for p in leftovers)}")


def _remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
