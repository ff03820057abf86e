"""Augmentation: 8 dihedral transforms x colour permutations fixing 0 x demonstration order (DESIGN §2).

Every augmentation has an exact inverse, so answers predicted under a view can be mapped back to the original
task. Random draws are deterministic for a seed (numpy ``Generator``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arc import N_COLOURS, Pair, Task

# Dihedral group D4 as (quarter turns k, transpose first?): g(x) = rot90(x.T if t else x, k).
_D4 = [(k, t) for t in (False, True) for k in range(4)]
N_DIHEDRAL = len(_D4)


def dihedral(grid: np.ndarray, d: int) -> np.ndarray:
    k, t = _D4[d]
    return np.ascontiguousarray(np.rot90(grid.T if t else grid, k))


def dihedral_inverse(grid: np.ndarray, d: int) -> np.ndarray:
    k, t = _D4[d]
    g = np.rot90(grid, -k)
    return np.ascontiguousarray(g.T if t else g)


@dataclass(frozen=True)
class Augmentation:
    """One view of a task. ``colours[c]`` is the new colour of ``c``; ``order[i]`` is the original index of the
    i-th demonstration in the view (None keeps the order)."""

    dihedral: int = 0
    colours: tuple[int, ...] = tuple(range(N_COLOURS))
    order: tuple[int, ...] | None = None

    def __post_init__(self):
        if not 0 <= self.dihedral < N_DIHEDRAL:
            raise ValueError(f"dihedral must be in 0..7, got {self.dihedral}")
        if sorted(self.colours) != list(range(N_COLOURS)) or self.colours[0] != 0:
            raise ValueError(f"colours must be a permutation of 0-9 fixing 0, got {self.colours}")
        if self.order is not None and sorted(self.order) != list(range(len(self.order))):
            raise ValueError(f"order must be a permutation, got {self.order}")

    @property
    def is_identity(self) -> bool:
        return (self.dihedral == 0 and self.colours == tuple(range(N_COLOURS))
                and (self.order is None or self.order == tuple(range(len(self.order)))))

    def grid(self, g: np.ndarray) -> np.ndarray:
        return np.asarray(self.colours, dtype=np.uint8)[dihedral(g, self.dihedral)]

    def invert_grid(self, g: np.ndarray) -> np.ndarray:
        inv = np.argsort(np.asarray(self.colours)).astype(np.uint8)
        return dihedral_inverse(inv[g], self.dihedral)

    def pair(self, p: Pair) -> Pair:
        return Pair(self.grid(p.input), None if p.output is None else self.grid(p.output))

    def invert_pair(self, p: Pair) -> Pair:
        return Pair(self.invert_grid(p.input), None if p.output is None else self.invert_grid(p.output))

    def _check_order(self, n: int) -> None:
        if self.order is not None and len(self.order) != n:
            raise ValueError(f"augmentation orders {len(self.order)} demonstrations, the task has {n}")

    def task(self, t: Task) -> Task:
        self._check_order(len(t.train))
        train = t.train if self.order is None else tuple(t.train[i] for i in self.order)
        return Task(t.id, tuple(self.pair(p) for p in train), tuple(self.pair(p) for p in t.test), t.file)

    def invert_task(self, t: Task) -> Task:
        self._check_order(len(t.train))
        train = tuple(self.invert_pair(p) for p in t.train)
        if self.order is not None:
            restored = [None] * len(train)
            for i, src in enumerate(self.order):
                restored[src] = train[i]
            train = tuple(restored)
        return Task(t.id, train, tuple(self.invert_pair(p) for p in t.test), t.file)


def random_augmentation(rng: np.random.Generator, n_demos: int | None = None, *, dihedral_: bool = True,
                        colours: bool = True, order: bool = True) -> Augmentation:
    """Draw a view uniformly: any of the 8 transforms, any permutation of colours 1-9, any demo order."""
    d = int(rng.integers(N_DIHEDRAL)) if dihedral_ else 0
    perm = (0, *(int(c) + 1 for c in rng.permutation(N_COLOURS - 1))) if colours else tuple(range(N_COLOURS))
    ordr = tuple(int(i) for i in rng.permutation(n_demos)) if (order and n_demos) else None
    return Augmentation(d, perm, ordr)


def views(n: int, seed: int) -> list[Augmentation]:
    """``n`` deterministic evaluation views: the identity first, then the other dihedral transforms, each with
    a random colour permutation (demonstration order kept)."""
    rng = np.random.default_rng(seed)
    out = [Augmentation()]
    for i in range(1, n):
        a = random_augmentation(rng, order=False)
        out.append(Augmentation(i % N_DIHEDRAL, a.colours, None))
    return out
