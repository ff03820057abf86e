"""Files: atomic writes (a crash mid-write leaves the previous file, or none, never a half-written one), JSON reads
whose errors name the line and column, and a run's metrics log (JSON lines, appended; read back for plots)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def names_file(path: str | os.PathLike) -> Iterator[None]:
    """OSErrors raised inside name ``path`` where the system named no file: a failed write() or fsync() (a full
    disk) does not, and the user must learn which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # Created the way open() creates a file, so the umask decides its mode (mkstemp's would be 0600 whatever it is);
    # O_EXCL: the random name is never another writer's.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        with names_file(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def writable_dir(path: str | os.PathLike) -> Path:
    """Create the directory ``path`` where needed and prove that a file can be written in it, or raise the OSError
    naming it: commands that work for minutes check where their results go first."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:  # named as the directory the user gave, not a parent or the probe's random name
        raise type(e)(e.errno, e.strerror, str(path)) from None
    return path


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, error: Callable[[str], Exception]) -> Any:
    """Read a JSON file; an unreadable file or invalid JSON raises ``error(what)``, what naming line and column
    (the caller's error type adds the file and its context)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError:  # Python refuses to parse integers of more than sys.get_int_max_str_digits() digits
        raise error(f"invalid JSON: a number too long to read (over {sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise error("invalid JSON: nested too deeply") from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write and fsync ``path`` (not atomically: for files inside a directory that is itself renamed into place)."""
    with names_file(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """One record as one line of a JSON-lines file (a run's metrics.jsonl)."""
    with names_file(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl, in order. A run killed mid-line leaves a partial last line: skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is this a run directory?)")
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if n < len(lines):
                    raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    return out
