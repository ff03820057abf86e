"""Which pairs train and which are scored (DESIGN §2, "Splits"), and the per-epoch training stream.

``training_items`` and ``split_items`` are the two sides: what a run trains on, and the test inputs it is scored
on.

Training uses *full* tasks (every pair, test pairs included) of ``train_splits`` and only the *demonstration*
pairs of ``demo_splits`` (the TRM protocol adds the evaluation tasks' demonstrations). The split that is scored
must not be among the full ones: its test outputs can then never reach a training batch (tested).

Each epoch draws one fresh augmentation per item (and per repeat), shuffles the order of its pairs (the last one
is the query), serialises it, skips and counts sequences over ``max_len``, and plans token-budget batches.
Everything is a pure function of ``(seed, epoch)``, so a run can resume at any batch.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..config import Config, ConfigError
from .arc import MAX_SIDE, Pair, Source, Task, filter_max_side, load_source
from .augment import Augmentation, random_augmentation
from .batching import Batch, collate, padded, plan_batches, shard
from .tokens import Encoded, encode, encode_prompt


class LeakageError(ValueError):
    """A configuration that would train on the outputs it is scored on."""


@dataclass(frozen=True)
class TrainItem:
    task_id: str
    split: str
    pairs: tuple[Pair, ...]
    kinds: tuple[str, ...]  # provenance of each pair: "train[i]" or "test[i]"


@dataclass(frozen=True)
class EvalItem:
    """One scored test input: the demonstrations, the input, and (when known) the target."""

    task_id: str
    index: int  # position among the task's test inputs
    demos: tuple[Pair, ...]
    input: np.ndarray
    target: np.ndarray | None

    def prompt(self, aug: Augmentation | None = None, *, header: bool = False) -> Encoded:
        """The prompt under ``aug`` (None: as given); ``header``: grids with their size first."""
        if aug is None:
            return encode_prompt(self.demos, self.input, header=header)
        t = aug.task(Task(self.task_id, self.demos, (Pair(self.input, None),)))
        return encode_prompt(t.train, t.test[0].input, header=header)


def training_items(source: Source, *, train_splits: Sequence[str] = ("train",), demo_splits: Sequence[str] = (),
                   eval_split: str | None = None, max_side: int = 30) -> list[TrainItem]:
    """Training items of a source. Raises :class:`LeakageError` if ``eval_split`` is trained in full."""
    if eval_split is not None and eval_split in train_splits:
        raise LeakageError(f"split {eval_split!r} is scored, so it may only contribute demonstration pairs "
                           f"(data.demo_splits), not whole tasks (data.train_splits={list(train_splits)})")
    overlap = set(train_splits) & set(demo_splits)
    if overlap:
        raise LeakageError(f"splits {sorted(overlap)} are in both data.train_splits and data.demo_splits")
    items = []
    for split in train_splits:
        for t in filter_max_side(source.split(split), max_side):
            test = [(p, f"test[{i}]") for i, p in enumerate(t.test) if p.output is not None]
            pairs = [(p, f"train[{i}]") for i, p in enumerate(t.train)] + test
            items.append(TrainItem(t.id, split, tuple(p for p, _ in pairs), tuple(k for _, k in pairs)))
    for split in demo_splits:
        for t in filter_max_side(source.split(split), max_side):
            items.append(TrainItem(t.id, split, t.train, tuple(f"train[{i}]" for i in range(len(t.train)))))
    return items


def eval_items(tasks: Sequence[Task]) -> list[EvalItem]:
    """Every test input of ``tasks``, in order, as a scored item."""
    return [EvalItem(t.id, i, t.train, p.input, p.output) for t in tasks for i, p in enumerate(t.test)]


def split_items(cfg: Config, split: str | None = None, limit: int | None = None, *, max_side: int = MAX_SIDE
                ) -> list[EvalItem]:
    """The scored test inputs of a config's evaluation split (or ``split``); the first ``limit`` of them when given.
    Every task of the split by default (a submission must answer them all, whatever the run trained on); those
    whose grids all fit ``max_side`` where a caller picks a subset (the demo, the in-training evaluation)."""
    src = load_source(cfg.data.source)
    name = split or cfg.data.eval_split
    if split is None and name not in src.splits and len(src.splits) == 1:
        name = next(iter(src.splits))  # a flat directory or a single file has one split: the run's default is it
    items = eval_items(filter_max_side(src.split(name), max_side))
    return items[:limit] if limit else items


@dataclass
class Epoch:
    """This rank's batches for one epoch, plus what was left out (never silently)."""

    batches: list[list[tuple[int, Encoded]]]  # (item index, sequence) per batch
    skipped: int  # sequences over max_len (across all ranks)
    dropped: int  # trailing batches dropped to keep ranks even
    total: int  # sequences drawn (across all ranks)
    deferred: int = 0  # the longest sequences, left to a later epoch by the curriculum (across all ranks)
    share: float = 1.0  # the share of the shortest sequences it trains on (< 1 under a curriculum)

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, i: int, items: Sequence[TrainItem]) -> Batch:
        seqs = self.batches[i]
        return collate([s for _, s in seqs], [items[j].task_id for j, _ in seqs])


CURRICULUM_START = 0.05  # data.curriculum: the share of the shortest sequences a run starts on
CURRICULUM_STEP = 1.25  # data.curriculum: an epoch ends once progress asks for this many times its share


def progress_share(progress: float, fraction: float) -> float:
    """``data.curriculum``: the share of an epoch's shortest sequences that a run at ``progress`` (in [0, 1])
    trains on: rising linearly from ``CURRICULUM_START`` to every sequence at ``progress == fraction``."""
    return min(1.0, max(progress / fraction, CURRICULUM_START))


class TrainingSet:
    """The augmented, token-budget-batched training stream, deterministic in ``(seed, epoch)``."""

    def __init__(self, items: Sequence[TrainItem], *, max_len: int, tokens_per_batch: int, augment: bool = True,
                 repeats: int = 1, seed: int = 0, rank: int = 0, world: int = 1, header: bool = False,
                 curriculum_epochs: int = 0):
        if tokens_per_batch < padded(max_len):
            raise ValueError(f"tokens_per_batch ({tokens_per_batch}) must hold one sequence of max_len ({max_len}) "
                             f"padded to a multiple of 8")
        if not items:
            raise ValueError("no training items (check data.train_splits / data.demo_splits / data.max_side)")
        self.items = list(items)
        self.max_len, self.tokens_per_batch = max_len, tokens_per_batch
        self.augment, self.repeats, self.seed = augment, repeats, seed
        self.rank, self.world = rank, world
        self.header = header  # grids with their size first (model.size_header)
        self.curriculum_epochs = curriculum_epochs  # data.curriculum_epochs: short sequences first

    def sequences(self, epoch: int) -> list[tuple[int, Encoded]]:
        """Every (item, augmented sequence) of an epoch, before the length filter."""
        rng = np.random.default_rng([self.seed, epoch])
        out = []
        for _ in range(self.repeats):
            for i, item in enumerate(self.items):
                pairs = item.pairs
                if self.augment:
                    aug = random_augmentation(rng, len(pairs))
                    pairs = aug.task(Task(item.task_id, pairs, ())).train
                out.append((i, encode(pairs, header=self.header)))
        return out

    def curriculum_share(self, epoch: int) -> float:
        """The fraction of an epoch's sequences it trains on, the shortest first: ``(epoch + 1) / (K + 1)`` for
        the first K = ``data.curriculum_epochs`` epochs, then 1 (every sequence)."""
        K = self.curriculum_epochs
        return (epoch + 1) / (K + 1) if epoch < K else 1.0

    def epoch(self, epoch: int, share: float | None = None) -> Epoch:
        """The plan of ``epoch`` on the shortest ``share`` of its sequences (default: ``curriculum_share``)."""
        seqs = self.sequences(epoch)
        kept = [s for s in seqs if len(s[1]) <= self.max_len]
        skipped, deferred = len(seqs) - len(kept), 0
        share = self.curriculum_share(epoch) if share is None else share
        if share < 1.0 and kept:
            n = max(1, math.ceil(share * len(kept)))
            shortest = np.argsort([len(s) for _, s in kept], kind="stable")[:n]
            deferred = len(kept) - n
            kept = [kept[j] for j in sorted(shortest.tolist())]
        rng = np.random.default_rng([self.seed, epoch, 1])
        plan = plan_batches([len(s) for _, s in kept], self.tokens_per_batch, rng)
        mine, dropped = shard(plan, self.rank, self.world)
        return Epoch([[kept[j] for j in b] for b in mine], skipped, dropped, len(seqs), deferred, share)

    def iterate(self, start_epoch: int = 0, start_batch: int = 0, start_share: float = 1.0,
                share_now: Callable[[], float] | None = None) -> Iterator[tuple[int, int, Epoch, Batch]]:
        """Endless stream of (epoch, batch index, epoch plan, batch), from a resume position.

        ``share_now`` (``data.curriculum``) gives the share of the shortest sequences that the run's progress asks
        for: each epoch is planned on it, and ends early once it asks for ``CURRICULUM_STEP`` times the epoch's
        share, so that a long epoch does not hold a run at a small share. ``start_share`` is the share of the
        resumed epoch when it had begun (``start_batch > 0``)."""
        epoch, b = start_epoch, start_batch
        while True:
            share = None
            if share_now is not None:
                share = start_share if (epoch, b) == (start_epoch, start_batch) and b > 0 else share_now()
            plan = self.epoch(epoch, share)
            if not plan.batches:
                if plan.dropped:
                    switch = "data.curriculum" if share_now is not None else "data.curriculum_epochs"
                    fix = f" or {switch}" if plan.deferred else ""
                    raise ConfigError(f"epoch {epoch} makes {plan.dropped} batch(es) for {self.world} ranks, and "
                                      f"every rank needs one: lower data.tokens_per_batch{fix} or raise data.repeats")
                raise ConfigError(f"epoch {epoch} has no batch: {plan.skipped} of {plan.total} sequences exceed "
                                  f"data.max_len={self.max_len}")
            while b < len(plan):
                if share_now is not None and plan.share < 1.0 and \
                        share_now() >= min(1.0, CURRICULUM_STEP * plan.share):
                    break  # the rest of this epoch's short sequences come again, freshly augmented, in the next
                yield epoch, b, plan, plan.batch(b, self.items)
                b += 1
            epoch, b = epoch + 1, 0
