"""The sanity ladder: procedurally generated ARC tasks whose rule is known (``dyntrm data synth``).

Every family is a rule that must be inferred from the demonstrations: the tasks of all families are mixed, so a
model sees a few pairs and has to tell which rule (and which per-task parameter: a colour map, a fill colour)
they show. The families, from easy to harder:

============  =====================================================================  ==================
family        output                                                                 output size
============  =====================================================================  ==================
identity      the input                                                              same
mirror        the input flipped left-right                                           same
rotate        the input rotated 90 degrees clockwise                                 w x h
transpose     the input transposed                                                   w x h
recolour      every colour replaced by a per-task map shown by the demonstrations    same
gravity       every coloured cell falls to the bottom of its column                  same
scale2        every cell becomes a 2 x 2 block                                       2h x 2w
tile          the input twice, side by side                                          h x 2w
crop          the bounding box of the one object on a blank grid                     the object's box
fill          the inside of each closed rectangle filled with a per-task colour      same
============  =====================================================================  ==================

Training augments tasks with the 8 dihedral transforms, so "mirror" also trains the up-down flip, "rotate" the
other rotations. Tasks are written as ARC JSON files, ``training/`` and ``evaluation/``, named
``FAMILY-INDEX.json`` (the family is read back from the task id by :func:`family_of`). Training and evaluation
tasks come from separate random streams, so no held-out task is a training task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .arc import MAX_SIDE, Pair, Task

Grid = np.ndarray
Rng = np.random.Generator


def _noise(rng: Rng, h: int, w: int, colours: Sequence[int] | None = None) -> Grid:
    """A grid of background 0 with a random fraction (0.3-0.8) of cells coloured from ``colours`` (default 1-9)."""
    colours = np.arange(1, 10) if colours is None else np.asarray(colours)
    g = rng.choice(colours, size=(h, w)).astype(np.uint8)
    g[rng.random((h, w)) > rng.uniform(0.3, 0.8)] = 0
    return g


def _side(rng: Rng, sides: tuple[int, int]) -> int:
    return int(rng.integers(sides[0], sides[1] + 1))


# ------------------------------------------------------------------------------------------------ families
# A family is ``params(rng) -> p`` (drawn once per task) and ``pair(rng, sides, p) -> (input, output)``.

@dataclass(frozen=True)
class Family:
    name: str
    pair: Callable[[Rng, tuple[int, int], dict], tuple[Grid, Grid]]
    params: Callable[[Rng], dict] = lambda rng: {}
    min_side: int = 1  # the smallest input side the rule makes sense for
    scale: int = 1  # the output's largest side is at most this x the input's


def _plain(rule: Callable[[Grid], Grid]):
    def pair(rng: Rng, sides: tuple[int, int], p: dict) -> tuple[Grid, Grid]:
        g = _noise(rng, _side(rng, sides), _side(rng, sides))
        return g, rule(g)
    return pair


def _recolour_params(rng: Rng) -> dict:
    palette = rng.choice(np.arange(1, 10), size=int(rng.integers(2, 5)), replace=False)
    mapping = np.arange(10, dtype=np.uint8)
    mapping[palette] = rng.choice(np.arange(1, 10), size=len(palette), replace=False)
    if np.array_equal(mapping[palette], palette):  # a map that changes nothing would be the identity family
        mapping[palette] = np.roll(mapping[palette], 1)
    return {"palette": palette, "mapping": mapping}


def _recolour(rng: Rng, sides: tuple[int, int], p: dict) -> tuple[Grid, Grid]:
    g = _noise(rng, _side(rng, sides), _side(rng, sides), p["palette"])
    return g, p["mapping"][g]


def gravity(g: Grid) -> Grid:
    """Coloured cells fall to the bottom of their column, keeping their order."""
    out = np.zeros_like(g)
    for c in range(g.shape[1]):
        col = g[:, c][g[:, c] != 0]
        if col.size:
            out[-col.size:, c] = col
    return out


def _crop(rng: Rng, sides: tuple[int, int], p: dict) -> tuple[Grid, Grid]:
    h, w = _side(rng, sides), _side(rng, sides)
    oh, ow = int(rng.integers(1, h)), int(rng.integers(1, w))  # strictly smaller than the grid
    obj = _noise(rng, oh, ow)
    # the object touches every side of its box, so the box is exactly its bounding box
    for r, c in ((0, rng.integers(ow)), (oh - 1, rng.integers(ow)), (rng.integers(oh), 0), (rng.integers(oh), ow - 1)):
        if obj[r, c] == 0:
            obj[r, c] = rng.integers(1, 10)
    g = np.zeros((h, w), np.uint8)
    r0, c0 = int(rng.integers(h - oh + 1)), int(rng.integers(w - ow + 1))
    g[r0:r0 + oh, c0:c0 + ow] = obj
    return g, obj


def _fill_params(rng: Rng) -> dict:
    edge, inside = rng.choice(np.arange(1, 10), size=2, replace=False)
    return {"edge": int(edge), "inside": int(inside)}


def _fill(rng: Rng, sides: tuple[int, int], p: dict) -> tuple[Grid, Grid]:
    """One to three hollow rectangles (at least 3 x 3, not touching) on a blank grid, plus scattered cells of
    other colours; the output fills every rectangle's inside."""
    h, w = _side(rng, sides), _side(rng, sides)
    g = np.zeros((h, w), np.uint8)
    taken = np.zeros((h, w), bool)
    boxes = []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(20):
            bh, bw = int(rng.integers(3, h + 1)), int(rng.integers(3, w + 1))
            r0, c0 = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
            if not taken[max(r0 - 1, 0):r0 + bh + 1, max(c0 - 1, 0):c0 + bw + 1].any():
                taken[r0:r0 + bh, c0:c0 + bw] = True
                boxes.append((r0, c0, bh, bw))
                break
    for r0, c0, bh, bw in boxes:
        g[r0:r0 + bh, c0:c0 + bw] = p["edge"]
        g[r0 + 1:r0 + bh - 1, c0 + 1:c0 + bw - 1] = 0
    others = np.setdiff1d(np.arange(1, 10), [p["edge"], p["inside"]])
    scatter = (rng.random((h, w)) < 0.15) & ~taken
    g[scatter] = rng.choice(others, size=int(scatter.sum()))
    out = g.copy()
    for r0, c0, bh, bw in boxes:
        out[r0 + 1:r0 + bh - 1, c0 + 1:c0 + bw - 1] = p["inside"]
    return g, out


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("identity", _plain(lambda g: g.copy())),
    Family("mirror", _plain(lambda g: g[:, ::-1].copy())),
    Family("rotate", _plain(lambda g: np.rot90(g, -1).copy())),
    Family("transpose", _plain(lambda g: g.T.copy())),
    Family("recolour", _recolour, _recolour_params),
    Family("gravity", _plain(gravity)),
    Family("scale2", _plain(lambda g: g.repeat(2, 0).repeat(2, 1)), scale=2),
    Family("tile", _plain(lambda g: np.hstack([g, g])), scale=2),
    Family("crop", _crop, min_side=2),
    Family("fill", _fill, _fill_params, min_side=3),
)}


# ------------------------------------------------------------------------------------------------ tasks

def family_of(task_id: str) -> str:
    """The family of a ladder task id ``FAMILY-INDEX`` (ids of other tasks come back unchanged)."""
    return task_id.rsplit("-", 1)[0]


def make_task(family: str, index: int, rng: Rng, sides: tuple[int, int], demos: int = 3, tests: int = 1) -> Task:
    """One task of ``family``: ``demos`` demonstrations and ``tests`` test pairs under one per-task parameter.

    A recolour task's demonstrations show every colour of its palette (redrawn until they do), so the map of
    every test colour can be inferred."""
    fam = FAMILIES[family]
    lo = max(sides[0], fam.min_side)
    hi = min(max(sides[1], lo), MAX_SIDE // fam.scale)
    lo = min(lo, hi)
    p = fam.params(rng)
    for _ in range(100):
        pairs = [Pair(*fam.pair(rng, (lo, hi), p)) for _ in range(demos + tests)]
        shown = set(np.unique(np.concatenate([q.input.ravel() for q in pairs[:demos]])).tolist())
        needed = set(np.unique(np.concatenate([q.input.ravel() for q in pairs[demos:]])).tolist())
        if needed <= shown:
            break
    return Task(f"{family}-{index:05d}", tuple(pairs[:demos]), tuple(pairs[demos:]))


def ladder(families: Sequence[str], n_tasks: int, sides: tuple[int, int], seed: int, *, demos: int = 3,
           tests: int = 1, stream: int = 0) -> list[Task]:
    """``n_tasks`` tasks of every family, deterministic in (seed, stream); streams 0 and 1 are train and eval."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"known: {', '.join(FAMILIES)}")
    if not 1 <= sides[0] <= sides[1] <= MAX_SIDE:
        raise ValueError(f"sides {sides[0]}-{sides[1]}: need 1 <= A <= B <= {MAX_SIDE}")
    if n_tasks < 0 or demos < 1:
        raise ValueError(f"need tasks >= 0 and demos >= 1 (got {n_tasks} tasks, {demos} demos)")
    tasks = []
    for family in families:
        rng = np.random.default_rng([seed, stream, list(FAMILIES).index(family)])
        tasks += [make_task(family, i, rng, sides, demos, tests) for i in range(n_tasks)]
    return tasks


def write_ladder(out: str | Path, families: Sequence[str], n_tasks: int, n_eval: int, sides: tuple[int, int],
                 seed: int, *, demos: int = 3) -> dict[str, int]:
    """Write ``training/`` (``n_tasks`` per family) and ``evaluation/`` (``n_eval`` per family) task files."""
    from ..io import write_json

    out = Path(out)
    counts = {}
    for split, n, stream in (("training", n_tasks, 0), ("evaluation", n_eval, 1)):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        tasks = ladder(families, n, sides, seed, demos=demos, stream=stream)
        for t in tasks:
            write_json(d / f"{t.id}.json", t.to_json(), indent=None)
        counts[split] = len(tasks)
    return counts


def parse_sides(text: str) -> tuple[int, int]:
    """``"3-6"`` -> (3, 6); ``"5"`` -> (5, 5)."""
    try:
        a, _, b = text.partition("-")
        sides = (int(a), int(b or a))
    except ValueError:
        raise ValueError(f"--sides {text!r}: expected A-B, e.g. 3-6") from None
    return sides
