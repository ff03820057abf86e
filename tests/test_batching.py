"""Token-budget batching, padding masks, rank sharding, skip counting, and the no-leakage guarantee."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dyntrm.data.arc import Pair, Source, Task, load_source
from dyntrm.data.batching import collate, padded, plan_batches, shard
from dyntrm.data.dataset import CURRICULUM_START, CURRICULUM_STEP, LeakageError, TrainingSet, progress_share, training_items
from dyntrm.data.tokens import PAD, encode, tokens_to_grid, OUT, END


@given(st.lists(st.integers(1, 300), min_size=1, max_size=200), st.integers(38, 250).map(lambda k: 8 * k), st.integers(0, 99))
def test_plan_batches_partitions_within_budget(lengths, budget, seed):
    batches = plan_batches(lengths, budget, np.random.default_rng(seed), window=64)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))  # every sequence exactly once
    for b in batches:
        assert len(b) * max(padded(lengths[i]) for i in b) <= budget


def test_bucketing_keeps_padding_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 2000)
    batches = plan_batches(lengths, 4096, np.random.default_rng(1))
    real = sum(lengths)
    padded_total = sum(len(b) * padded(max(lengths[i] for i in b)) for b in batches)
    assert padded_total / real < 1.1


@given(st.integers(1, 40), st.integers(1, 4))
def test_shard_even_and_disjoint(n, world):
    batches = [[i] for i in range(n)]
    parts = [shard(batches, r, world) for r in range(world)]
    assert len({len(p) for p, _ in parts}) == 1  # every rank steps the same number of times
    seen = [i for p, _ in parts for b in p for i in b]
    assert len(seen) == len(set(seen)) and len(seen) + parts[0][1] == n


def test_collate_masks():
    a = encode([Pair(np.array([[1]]), np.array([[2]]))])
    b = encode([Pair(np.array([[1, 2], [3, 4]]), np.array([[5]]))])
    batch = collate([a, b], ["a", "b"])
    assert batch.tokens.shape == (2, padded(len(b)))
    assert batch.attention_mask.sum(1).tolist() == [len(a), len(b)]
    assert (batch.tokens[~batch.attention_mask] == PAD).all()
    assert not batch.target[~batch.attention_mask].any()
    assert batch.prompt_end.tolist() == [a.prompt_end, b.prompt_end]
    assert (batch.tokens[0, batch.prompt_end[0]] == OUT).item()


def _tiny_source(n=12):
    rng = np.random.default_rng(0)

    def task(i, split):
        pairs = tuple(Pair(rng.integers(0, 10, (3, 4)).astype(np.uint8), rng.integers(0, 10, (4, 3)).astype(np.uint8))
                      for _ in range(3))
        # Test outputs of the evaluation split have a shape that appears nowhere else: 1x29 (29x1 transposed).
        out = np.full((1, 29), 7, np.uint8) if split == "eval" else rng.integers(0, 10, (2, 2)).astype(np.uint8)
        return Task(f"{split}{i}", pairs, (Pair(pairs[0].input, out),))

    return Source("synthetic", {s: [task(i, s) for i in range(n)] for s in ("train", "eval")})


def test_epoch_is_deterministic_reshuffled_and_counts_skips():
    items = training_items(_tiny_source(), train_splits=("train",))
    ts = TrainingSet(items, max_len=256, tokens_per_batch=256, seed=1)
    e0, e0b, e1 = ts.epoch(0), ts.epoch(0), ts.epoch(1)
    ids = lambda e: [[i for i, _ in b] for b in e.batches]  # noqa: E731
    assert ids(e0) == ids(e0b) and ids(e0) != ids(e1)
    assert e0.skipped == 0 and sorted(i for b in ids(e0) for i in b) == list(range(12))
    # 3 pairs of 3x4 -> 4x3 plus a 3x4 -> 2x2 pair: every sequence is over 60 tokens, so all are skipped and counted
    ts = TrainingSet(items, max_len=60, tokens_per_batch=256, seed=1)
    assert ts.epoch(0).skipped == ts.epoch(0).total == 12 and ts.epoch(0).batches == []
    with pytest.raises(ValueError, match="exceed data.max_len=60"):
        next(ts.iterate())


@given(st.integers(1, 4), st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_curriculum_trains_the_shortest_first_then_everything(K, seed):
    """data.curriculum_epochs: epoch e < K holds exactly the ceil((e+1)/(K+1) * n) shortest sequences of that epoch
    (counted as deferred, not lost); from epoch K on the plan is the one without a curriculum."""
    rng = np.random.default_rng(seed)

    def grid():
        return rng.integers(0, 10, tuple(rng.integers(1, 7, 2))).astype(np.uint8)

    tasks = [Task(f"t{i}", tuple(Pair(grid(), grid()) for _ in range(2)), (Pair(grid(), grid()),)) for i in range(15)]
    items = training_items(Source("varied", {"train": tasks}), train_splits=("train",))
    plain = TrainingSet(items, max_len=1024, tokens_per_batch=2048, seed=seed)
    cur = TrainingSet(items, max_len=1024, tokens_per_batch=2048, seed=seed, curriculum_epochs=K)
    ids = lambda e: [[i for i, _ in b] for b in e.batches]  # noqa: E731
    for e in range(K):
        lengths = sorted(len(s) for _, s in cur.sequences(e))
        n = math.ceil((e + 1) / (K + 1) * len(lengths))
        ep = cur.epoch(e)
        assert sorted(len(s) for b in ep.batches for _, s in b) == lengths[:n]
        assert (ep.deferred, ep.skipped, ep.total) == (len(lengths) - n, 0, len(lengths))
    assert ids(cur.epoch(K)) == ids(plain.epoch(K)) and cur.epoch(K).deferred == 0


def test_curriculum_too_short_for_the_ranks_names_the_switch():
    """An early curriculum epoch too small to give every rank a batch stops with a message naming the switch."""
    items = training_items(_tiny_source(), train_splits=("train",))
    ts = TrainingSet(items, max_len=512, tokens_per_batch=512, seed=0, rank=0, world=2, curriculum_epochs=11)
    assert ts.epoch(0).deferred == 11 and ts.epoch(0).dropped == 1
    with pytest.raises(ValueError, match="epoch 0 makes 1 batch.*data.curriculum_epochs"):
        next(ts.iterate())


def test_progress_share_by_hand():
    """data.curriculum = f: the share rises linearly with progress from CURRICULUM_START to 1 at progress f."""
    assert CURRICULUM_START == 0.05 and CURRICULUM_STEP == 1.25
    assert [progress_share(p, 0.2) for p in (0.0, 0.005, 0.05, 0.1, 0.2, 0.7)] == [0.05, 0.05, 0.25, 0.5, 1.0, 1.0]


def _varied_items(seed, n=15):
    rng = np.random.default_rng(seed)

    def grid():
        return rng.integers(0, 10, tuple(rng.integers(1, 7, 2))).astype(np.uint8)

    tasks = [Task(f"t{i}", tuple(Pair(grid(), grid()) for _ in range(2)), (Pair(grid(), grid()),)) for i in range(n)]
    return training_items(Source("varied", {"train": tasks}), train_splits=("train",))


@given(st.sampled_from([0.3, 0.5, 1.0]), st.integers(0, 2**16))
@settings(max_examples=10, deadline=None)
def test_progress_curriculum_stream_and_its_resume(f, seed):
    """data.curriculum with progress = batches drawn / 60: each epoch is planned on the share progress asks for at
    its start (the shortest sequences, by hand), it ends exactly when progress asks for CURRICULUM_STEP x that
    share, the epochs after progress f are the plain ones, and a stream resumed anywhere (epoch, batch, the epoch's
    share) goes on exactly as the unbroken one."""
    items = _varied_items(seed, n=40)
    ts = TrainingSet(items, max_len=256, tokens_per_batch=256, seed=seed)
    plain = TrainingSet(items, max_len=256, tokens_per_batch=256, seed=seed)
    ids = lambda b: [i for i, _ in b]  # noqa: E731

    def run(start=(0, 0, 1.0), drawn=0, n=90):
        count = {"n": drawn}
        share_now = lambda: progress_share(count["n"] / 60, f)  # noqa: E731
        out, stream = [], ts.iterate(*start, share_now=share_now)
        for _ in range(n):
            expect_share = share_now()
            epoch, b, plan, batch = next(stream)
            out.append((epoch, b, plan.share, ids(plan.batches[b]), expect_share))
            count["n"] += 1
        return out

    full = run()
    cuts = 0
    for k, (epoch, b, share, batch_ids, asked) in enumerate(full):
        first = k == 0 or full[k - 1][0] != epoch
        if first:  # planned on what progress asked for at its start: the shortest share of its sequences
            assert b == 0 and share == asked
            lengths = sorted(len(s) for _, s in ts.sequences(epoch))
            n = math.ceil(share * len(lengths)) if share < 1 else len(lengths)
            ep = ts.epoch(epoch, share)
            assert sorted(len(s) for bb in ep.batches for _, s in bb) == lengths[:n]
            if k > 0:  # the epoch before ended because it ran out or because progress asked for more
                pe, pb, pshare = full[k - 1][:3]
                ran_out = pb == len(ts.epoch(pe, pshare)) - 1
                assert ran_out or asked >= min(1.0, CURRICULUM_STEP * pshare)
                cuts += not ran_out
                assert epoch == pe + 1
        else:  # within an epoch progress never asked for CURRICULUM_STEP x its share
            assert share == 1.0 or asked < min(1.0, CURRICULUM_STEP * share)
        if share == 1.0:
            assert batch_ids == ids(plain.epoch(epoch).batches[b])
    assert full[0][2] == CURRICULUM_START and full[-1][2] == 1.0 and cuts > 0  # some epochs did end early
    # resume from any position: (epoch, next batch, that epoch's share), progress restored
    for cut in (1, 7, 23, 41):
        epoch, b, share = full[cut - 1][:3]
        assert run((epoch, b + 1, share), drawn=cut, n=90 - cut) == full[cut:]


def test_both_curricula_at_once_is_refused():
    from dyntrm.config import ConfigError, apply_overrides, preset, validate

    with pytest.raises(ConfigError, match="data.curriculum=0.2 and data.curriculum_epochs=3: choose one"):
        validate(apply_overrides(preset("tiny"), ["data.curriculum=0.2", "data.curriculum_epochs=3"]))


def test_ranks_split_an_epoch():
    items = training_items(_tiny_source(40), train_splits=("train",))
    sets = [TrainingSet(items, max_len=512, tokens_per_batch=512, seed=3, rank=r, world=2) for r in range(2)]
    epochs = [s.epoch(5) for s in sets]
    assert len(epochs[0]) == len(epochs[1]) > 0
    seen = [i for e in epochs for b in e.batches for i, _ in b]
    assert len(seen) == len(set(seen))


def test_no_eval_test_output_reaches_training():
    src = _tiny_source()
    items = training_items(src, train_splits=("train",), demo_splits=("eval",), eval_split="eval")
    ts = TrainingSet(items, max_len=512, tokens_per_batch=1024, seed=0, repeats=3)
    for epoch in range(3):
        plan = ts.epoch(epoch)
        assert plan.skipped == 0
        for b in range(len(plan)):
            batch = plan.batch(b, items)
            for row, mask in zip(batch.tokens.numpy(), batch.attention_mask.numpy()):
                toks = row[mask].tolist()
                # decode every output grid in the sequence: none may be the 1x29 eval test output, in any view
                starts = [i + 1 for i, t in enumerate(toks) if t == OUT]
                for s in starts:
                    grid = tokens_to_grid(toks[s:toks.index(END, s)])
                    assert sorted(grid.shape) != [1, 29]
    with pytest.raises(LeakageError):
        training_items(src, train_splits=("train", "eval"), eval_split="eval")


def test_no_eval_test_output_in_real_arc1_training_items():
    src = load_source("arc1")
    items = training_items(src, train_splits=("train",), demo_splits=("eval",), eval_split="eval")
    eval_ids = {t.id for t in src.split("eval")}
    assert len(items) == 800
    for it in items:
        if it.split == "eval":
            assert it.task_id in eval_ids and all(k.startswith("train[") for k in it.kinds)
            task = src.find(it.task_id)
            assert len(it.pairs) == len(task.train)
            # by content as well: no pair of the item is a test pair of its task
            for p in it.pairs:
                for tp in task.test:
                    assert not (np.array_equal(p.input, tp.input) and np.array_equal(p.output, tp.output))
