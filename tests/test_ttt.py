"""Test-time training and view-consistent scoring (issue 12): isolation, what trains, no test output in a batch,
the loss it lowers, likelihood ranking by hand, the command line."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dyntrm.evaluate as E
import dyntrm.ttt as T
from dyntrm.cli import main
from dyntrm.config import ConfigError
from dyntrm.data.arc import MAX_SIDE, Pair, Task
from dyntrm.data.augment import Augmentation, dihedral, views
from dyntrm.data.dataset import EvalItem, eval_items, split_items
from dyntrm.data.tokens import END, IN, OUT, SIZE0, VOCAB_SIZE, decode_answer, tokens_to_grid
from dyntrm.evaluate import evaluate_items
from dyntrm.model import ArcTransformer
from dyntrm.model.generate import Generation
from dyntrm.rescore import candidate_likelihoods
from dyntrm.ttt import TTT, loo_batch, task_loss, trainable
from helpers import TASKS, assert_close_by_norm, debug_cfg, params
from conftest import grids

G = lambda *rows: np.array(rows, dtype=np.uint8)  # noqa: E731


def _model(seed: int = 0) -> ArcTransformer:
    torch.manual_seed(seed)
    model = ArcTransformer(debug_cfg().model).eval()
    with torch.no_grad():  # the halt head starts at 0, which sends its norm no gradient; a trained one does not
        model.block.halt.weight.normal_(std=0.1)
    return model


def _ttt(**kw) -> TTT:
    return TTT(**{"steps": 2, "lr": 3e-3, "recipe": debug_cfg().train, **kw})


def _owners(items):
    """One identity view per item: the (item index, view) list that ``TTT.per_task`` groups by task."""
    return [(i, Augmentation()) for i in range(len(items))]


def _adapted(model, ttt, items) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's adapted weights, in the order ``per_task`` yields them."""
    return {rec["task"]: params(answerers[0][0]) for answerers, rec in ttt.per_task(model, items, _owners(items))}


# ------------------------------------------------------------------------------------------------ isolation

def test_ttt_leaves_the_model_untouched_and_tasks_independent():
    model, items = _model(), split_items(debug_cfg())
    before = params(model)
    ttt = _ttt()
    results, stats = evaluate_items(model, items, n_views=2, ttt=ttt)
    assert all(torch.equal(before[k], v) for k, v in params(model).items())  # bit-identical after a full eval
    assert stats["ttt_tasks"] == 6 and stats["ttt_seconds_per_task"] > 0 and len(results) == len(items)

    everything = _adapted(model, ttt, items)
    last = items[-1].task_id  # adapted after five other tasks, then alone: the same weights to the bit
    alone = _adapted(model, ttt, [it for it in items if it.task_id == last])[last]
    assert all(torch.equal(alone[k], v) for k, v in everything[last].items())
    # adaptation really moved the weights, and another seed moves them elsewhere (deterministic, not constant)
    assert any(not torch.equal(before[k], v) for k, v in alone.items())
    other = _adapted(model, replace(ttt, seed=1), [it for it in items if it.task_id == last])[last]
    assert any(not torch.equal(other[k], v) for k, v in alone.items())
    # the answers of a task do not depend on the tasks evaluated before it
    n_tasks = len({it.task_id for it in items})  # views are seeded by task: the last task is number n_tasks - 1
    solo, _ = evaluate_items(model, [items[-1]], n_views=2, seed=n_tasks - 1, ttt=ttt)
    assert [a.tolist() for a in solo[0].attempts] == [a.tolist() for a in results[-1].attempts]


def test_view_mode_adapts_one_copy_per_view_in_that_views_frame():
    model, items = _model(), split_items(debug_cfg())[:2]
    ttt = _ttt(mode="view")
    vs = views(3, 0)
    owners = [(i, v) for i in range(len(items)) for v in vs]
    for (answerers, record), item in zip(ttt.per_task(model, items, owners), items):
        assert record["views"] == 3 and record["seconds"] > 0
        # one copy per view, answering exactly that view's prompts
        assert sorted(k for _, sel in answerers for k in sel) == [k for k, (i, _) in enumerate(owners)
                                                                  if items[i].task_id == item.task_id]
        for (m, sel), v in zip(answerers, vs):
            assert all(owners[k][1] == v for k in sel)
            # ... and it is the copy adapted on the demonstrations as that view shows them
            want, _ = ttt.adapt(model, item.task_id, [v.pair(d) for d in item.demos], geometry=False)
            assert all(torch.equal(a, b) for a, b in zip(params(m).values(), params(want).values()))
    results, stats = evaluate_items(model, items, n_views=3, ttt=ttt, rank="both")
    assert stats["ttt_mode"] == "view" and len(results) == 2 and all(len(r.steps) == 3 for r in results)


def test_checkpoint_sizes_keep_the_checkpoints_headers_and_the_copys_cells():
    """--ttt-sizes checkpoint: every answer has the shape the checkpoint alone writes for that prompt, its cells are
    the adapted copy's; with the default (the copy writes all) the shapes move (the control: the test can fail)."""
    model, items = _model(), split_items(debug_cfg())[:3]

    def shapes_and_cells(ttt):
        res, stats = evaluate_items(model, items, n_views=2, ttt=ttt)
        return [[None if g is None else g.shape for g, _ in r.candidates] for r in res], \
            [[None if g is None else g.tobytes() for g, _ in r.candidates] for r in res], stats

    base_shapes, base_cells, _ = shapes_and_cells(None)
    shapes, cells, stats = shapes_and_cells(_ttt(steps=6, lr=3e-2, sizes="checkpoint"))
    assert stats["ttt_sizes"] == "checkpoint" and shapes == base_shapes and cells != base_cells
    moved, _, _ = shapes_and_cells(_ttt(steps=6, lr=3e-2, sizes="copy"))
    assert moved != base_shapes


def test_a_tasks_test_inputs_share_views_so_view_mode_adapts_once_per_view():
    model, items = _model(), split_items(debug_cfg())[:2]
    second = replace(items[0], index=1, input=items[0].input[::-1].copy())  # another test input of task 0
    fitted = E.fit_prompts([items[0], items[1], second], 3, seed=0, limit=None, header=True)
    assert [v for v, _ in fitted[0].prompts] == [v for v, _ in fitted[2].prompts]
    assert [v for v, _ in fitted[0].prompts] != [v for v, _ in fitted[1].prompts]
    owners = [(i, v) for i, f in enumerate(fitted) for v, _ in f.prompts]
    groups = list(_ttt(mode="view").per_task(model, [items[0], items[1], second], owners))
    assert [r["views"] for _, r in groups] == [3, 3]  # task 0: three copies for its six prompts
    assert [len(sel) for sel in (s for _, s in groups[0][0])] == [2, 2, 2]


@pytest.mark.parametrize("variant,which", [("dyn", "all"), ("dynmoe", "all"), ("dyn", "routing")])
def test_copies_side_by_side_adapt_as_each_would_alone(variant, which):
    """--ttt-copies: K copies adapted at once under torch.func.vmap (DynMoE's sparse dispatch through its own vmap
    rule, attention as matmuls, the sequences of tasks of different sizes padded to one length) end where each
    ends adapted alone: the same leave-one-out sequences, loss, per-copy clipping and AdamW slice."""
    torch.manual_seed(0)
    model = ArcTransformer(debug_cfg(f"model.variant={variant}").model).eval()
    with torch.no_grad():
        model.block.halt.weight.normal_(std=0.1)
    items = split_items(debug_cfg())
    a, b = items[0], next(it for it in items if it.demos[0].input.shape != items[0].demos[0].input.shape)
    flip = Augmentation(dihedral=1)
    jobs = [T.Job(a.task_id, tuple(a.demos), geometry=False), T.Job(b.task_id, tuple(b.demos)),
            T.Job(a.task_id, tuple(flip.pair(d) for d in a.demos), geometry=False)]
    ttt = _ttt(steps=3, lr=1e-2, params=which, batch=3)
    together, records = ttt.adapt_copies(model, jobs)
    before = params(model)
    for job, m, rec in zip(jobs, together, records):
        alone, want = ttt.adapt(model, job.task_id, job.demos, geometry=job.geometry)
        got, ref = params(m), params(alone)
        moved = [k for k in ref if not torch.equal(ref[k], before[k])]
        assert moved and (which == "all" or all(k.endswith((".proto", ".gate")) for k in moved))
        for k in ref:
            assert_close_by_norm(got[k] - before[k], ref[k] - before[k], 1e-3, k)
        assert rec["loss_first"] == pytest.approx(want["loss_first"], rel=1e-4)
        assert rec["loss_last"] == pytest.approx(want["loss_last"], rel=1e-4)
        assert rec["trained_numbers"] == want["trained_numbers"] and not m.training
    assert all(torch.equal(before[k], v) for k, v in params(model).items())


@pytest.mark.parametrize("mode,n_views,copies", [("view", 2, 5), ("view", 3, 2), ("task", 2, 3)])
def test_copies_answer_as_the_one_at_a_time_copies_do(mode, n_views, copies):
    """per_task with copies > 1 packs consecutive tasks' copies into runs of at most `copies` (several tasks in one
    run, a task's views split over runs, a single-demonstration task inside a run) and hands every task the
    copies of its own views, adapted as they would be one at a time, in the same order."""
    model, items = _model(), split_items(debug_cfg())
    tasks = list(dict.fromkeys(it.task_id for it in items))[:4]
    items = [next(it for it in items if it.task_id == t) for t in tasks]
    items[1] = replace(items[1], demos=items[1].demos[:1])  # answered by the model itself, inside a run
    owners = [(i, v) for i in range(len(items)) for v in views(n_views, 0)]
    one = list(_ttt(mode=mode).per_task(model, items, owners))
    many = list(_ttt(mode=mode, copies=copies).per_task(model, items, owners))
    assert [r["task"] for _, r in many] == [r["task"] for _, r in one] == tasks
    assert many[1][1].get("single_demo") and many[1][0][0][0] is model
    for (ans1, rec1), (ans_k, rec_k) in zip(one, many):
        assert [sel for _, sel in ans1] == [sel for _, sel in ans_k] and rec_k.get("views") == rec1.get("views")
        for (m1, _), (mk, _) in zip(ans1, ans_k):
            p1, pk = params(m1), params(mk)
            for k in p1:
                assert_close_by_norm(pk[k], p1[k], 1e-4, k)
    with pytest.raises(ConfigError, match="--ttt-copies 0"):
        _ttt(copies=0)


def test_a_copy_whose_loss_is_not_finite_skips_the_step_and_leaves_the_others(monkeypatch):
    """A copy whose last step's loss is NaN ends where it would alone (that step skipped: weights and AdamW moments
    restored), and the other copies of the run are not touched by it."""
    model, items = _model(), split_items(debug_cfg())
    a, b = items[0], next(it for it in items if it.task_id != items[0].task_id)
    jobs = [T.Job(a.task_id, tuple(a.demos)), T.Job(b.task_id, tuple(b.demos))]
    ttt, calls = _ttt(steps=3, lr=1e-2, batch=2), {}
    real = T.compute_loss

    def nan_at_bs_last_step(out, batch, *args, **kw):
        loss, parts = real(out, batch, *args, **kw)
        calls[batch.ids[0]] = calls.get(batch.ids[0], 0) + 1
        return (loss * float("nan") if batch.ids[0] == b.task_id and calls[b.task_id] == 3 else loss), parts

    monkeypatch.setattr(T, "compute_loss", nan_at_bs_last_step)
    together, records = ttt.adapt_copies(model, jobs)
    assert [r["skipped_steps"] for r in records] == [0, 1]
    for job, m in zip(jobs, together):
        calls.clear()
        alone, rec = ttt.adapt(model, job.task_id, job.demos)
        assert rec["skipped_steps"] == (job.task_id == b.task_id)
        got, ref = params(m), params(alone)
        assert all(torch.isfinite(v).all() for v in got.values())
        for k in ref:
            assert_close_by_norm(got[k], ref[k], 1e-4, k)


def test_a_frame_kept_batch_holds_the_demonstrations_as_given():
    rng = np.random.default_rng(0)
    demos = [Pair(rng.integers(0, 10, (2, 3)).astype(np.uint8), rng.integers(0, 10, (3, 2)).astype(np.uint8))
             for _ in range(3)]
    given = {(g.tobytes(), g.shape) for p in demos for g in (p.input, p.output)}
    batch = loo_batch("t", demos, [0, 1, 2, 0], rng, header=True, geometry=False).tokens.numpy()
    assert {(g.tobytes(), g.shape) for row in batch for g in _grids_of(row)} == given
    shuffled = loo_batch("t", demos, [0, 1, 2, 0], rng, header=True).tokens.numpy()  # the default: random views
    assert {(g.tobytes(), g.shape) for row in shuffled for g in _grids_of(row)} != given


def test_a_frame_kept_batch_with_colours_permutes_each_sequence_alike():
    """--ttt-colours: every sequence shows the demonstrations in their frame (shapes and cell layout as given) under
    one permutation of colours 1-9 of its own (0 fixed), applied alike to all its grids; sequences differ."""
    rng = np.random.default_rng(1)
    demos = [Pair(rng.integers(0, 10, (2, 3)).astype(np.uint8), rng.integers(0, 10, (3, 2)).astype(np.uint8))
             for _ in range(3)]
    batch = loo_batch("t", demos, [0, 1, 2, 0, 1, 2], rng, header=True, geometry=False, colours=True).tokens.numpy()
    perms = set()
    for row in batch:
        grids = _grids_of(row)
        assert len(grids) == 6
        sigma: dict[int, int] = {}
        for inp, out in zip(grids[::2], grids[1::2]):
            d = next(d for d in demos if d.input.shape == inp.shape
                     and _canonical(np.concatenate([d.input.ravel(), d.output.ravel()])[None])
                     == _canonical(np.concatenate([inp.ravel(), out.ravel()])[None]))
            for a, b in zip(np.concatenate([d.input.ravel(), d.output.ravel()]).tolist(),
                            np.concatenate([inp.ravel(), out.ravel()]).tolist()):
                assert sigma.setdefault(a, b) == b  # one permutation for the whole sequence
        assert sigma.get(0, 0) == 0 and len(set(sigma.values())) == len(sigma)
        perms.add(tuple(sorted(sigma.items())))
    assert len(perms) > 1


def _canonical(g: np.ndarray) -> bytes:
    """A grid up to a permutation of colours 1-9 (0 fixed): colours renamed in order of first appearance."""
    names = {0: 0}
    for c in g.reshape(-1).tolist():
        names.setdefault(c, len(names))
    return bytes(g.shape) + bytes(names[c] for c in g.reshape(-1).tolist())


def _grids_of(tokens: np.ndarray) -> list[np.ndarray]:
    """Every grid of a (padded) sequence: the spans after IN up to OUT and after OUT up to END (less their size
    header, where the model writes one)."""
    out, start = [], None
    body = lambda span: tokens_to_grid(span[(span < SIZE0) | (span >= SIZE0 + MAX_SIDE)])  # noqa: E731
    for i, t in enumerate(tokens.tolist()):
        if t in (IN, OUT):
            if start is not None and t == OUT:
                out.append(body(tokens[start:i]))
            start = i + 1
        elif t == END and start is not None:
            out.append(body(tokens[start:i]))
            start = None
    return out


def _leaks(batches: list[np.ndarray], targets: list[np.ndarray]) -> bool:
    """Whether any target, under any dihedral transform and colour permutation, is a grid of any sequence."""
    banned = {_canonical(dihedral(t, d)) for t in targets for d in range(8)}
    return any(_canonical(g) in banned for b in batches for row in b for g in _grids_of(row))


@pytest.mark.parametrize("mode", ["view", "task"])
def test_no_test_output_enters_a_ttt_batch(monkeypatch, mode):
    rng = np.random.default_rng(0)
    grid = lambda h, w: rng.integers(0, 10, (h, w)).astype(np.uint8)  # noqa: E731
    tasks = [Task(f"t{i}", tuple(Pair(grid(3, 3), grid(3, 3)) for _ in range(3)),
                  tuple(Pair(grid(3, 3), grid(3, 3)) for _ in range(2))) for i in range(3)]
    items = eval_items(tasks)
    seen = []
    collate = T.collate

    def recording(seqs, ids=()):
        batch = collate(seqs, ids)
        seen.append(batch.tokens.numpy())
        return batch

    monkeypatch.setattr(T, "collate", recording)
    _, stats = evaluate_items(_model(), items, n_views=2, ttt=_ttt(steps=3, batch=5, mode=mode))
    # every TTT batch was recorded: 3 steps per adapted copy (one per task, or one per task and view)
    assert all(b.shape[0] == 5 for b in seen) and (len(seen) == 3 * 3 if mode == "task" else len(seen) > 3 * 3)
    assert len(seen) % 3 == 0 and stats["ttt_mode"] == mode
    targets = [it.target for it in items]
    assert not _leaks(seen, targets)
    # the check can fail: a sequence that did hold a test pair is caught, whatever view it was under
    t = tasks[0]
    leaky = loo_batch(t.id, (*t.train, t.test[1]), [3], rng, header=True).tokens.numpy()
    assert _leaks([leaky], targets)


# ------------------------------------------------------------------------------------------------ what trains

@pytest.mark.parametrize("which", ["routing", "norms", "all"])
def test_ttt_params_selects_exactly_the_intended_parameters(which):
    model, items = _model(), split_items(debug_cfg())[:1]
    names = {n for n, _ in trainable(model, which)}
    want = {"routing": {n for n, _ in model.named_parameters() if n.split(".")[-1] in ("proto", "gate")},
            "norms": {"block.norm1.weight", "block.norm2.weight", "block.halt_norm.weight", "norm.weight"},
            "all": {n for n, _ in model.named_parameters()}}[which]
    assert names == want and names
    before = params(model)
    after = next(iter(_adapted(model, _ttt(params=which), items).values()))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == want  # every selected tensor moved; every other one is bit-identical


@pytest.mark.parametrize("which,mult", [("routing", 1.0), ("all", 0.1)])
def test_ttt_lr_is_the_lr_of_what_is_trained(which, mult):
    """One AdamW step moves an undecayed parameter by ~lr per element (|m / sqrt(v)| = 1 on the first step): the
    routers move by --ttt-lr when they are all that trains, by lr x train.routing_lr_mult beside everything else."""
    model, items = _model(), split_items(debug_cfg())[:1]
    recipe = replace(debug_cfg().train, routing_lr_mult=0.1)
    before = params(model)
    after = next(iter(_adapted(model, _ttt(steps=1, lr=1e-2, params=which, recipe=recipe), items).values()))
    steps = torch.cat([(after[n] - before[n]).abs().flatten() for n in before if n.endswith((".proto", ".gate"))])
    moved = steps[steps > 0]
    torch.testing.assert_close(moved.median(), torch.tensor(1e-2 * mult), rtol=0.05, atol=0)


def test_keep_shape_takes_the_shape_tokens_out_of_the_ttt_loss(monkeypatch):
    """--ttt-keep-shape: every TTT step's loss is the recipe's with structure_weight 0 (the shape's tokens weigh 0:
    test_train's by-hand loss), the rest of the recipe unchanged; it adapts to other weights than the default."""
    import dyntrm.ttt as T

    seen = []
    real = T.task_loss
    monkeypatch.setattr(T, "task_loss", lambda m, b, cfg: seen.append(cfg.train) or real(m, b, cfg))
    model, items = _model(), split_items(debug_cfg())[:1]
    kept = _adapted(model, _ttt(shape_loss=False), items)
    assert len(seen) == 2 and all(r == replace(debug_cfg().train, structure_weight=0.0) for r in seen)
    seen.clear()
    plain = _adapted(model, _ttt(), items)
    assert all(r == debug_cfg().train for r in seen)
    (k,), (p,) = kept.values(), plain.values()
    assert any(not torch.equal(k[n], p[n]) for n in k)


def test_ttt_lowers_the_tasks_leave_one_out_loss():
    """On sequences the adaptation never saw (other views), the task's loss goes down: a property, not a given."""
    cfg, model = debug_cfg(), _model()
    item = next(it for it in split_items(cfg) if it.task_id == "flip_lr")
    held_out = loo_batch(item.task_id, item.demos, [0, 1, 2, 0, 1, 2], np.random.default_rng(123), header=False)
    tuned, record = _ttt(steps=8, recipe=cfg.train).adapt(model, item.task_id, item.demos)
    with torch.no_grad():
        before, after = float(task_loss(model, held_out, cfg)), float(task_loss(tuned, held_out, cfg))
    assert after < 0.9 * before, (before, after)
    assert record["loss_last"] < record["loss_first"]


def test_a_single_demonstration_task_is_answered_without_ttt(capsys):
    model, items = _model(), split_items(debug_cfg())[:2]
    lone = replace(items[0], task_id="lone", demos=items[0].demos[:1])
    results, stats = evaluate_items(model, [lone, items[1]], n_views=1, ttt=_ttt())
    assert "lone: a single demonstration" in capsys.readouterr().err
    assert stats["ttt_single_demo_tasks"] == 1 and stats["ttt_tasks"] == 1
    plain, _ = evaluate_items(model, [lone], n_views=1)  # answered by the checkpoint itself, not dropped
    assert results[0].ranked and [a.tolist() for a in results[0].attempts] == [a.tolist() for a in plain[0].attempts]


# ------------------------------------------------------------------------------------------------ ranking

class PrefersZero(nn.Module):
    """A stand-in model: at every position the logit of colour 0 is 10, every other token's 0."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(size_header=False, max_positions=4096)
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, tokens, attention_mask=None, prompt_end=None, *, halt=False):
        assert halt  # scored at the halting step, as decoding runs
        self.seen.append(tokens)
        logits = torch.zeros(*tokens.shape, VOCAB_SIZE)
        logits[..., 0] = 10.0
        return SimpleNamespace(final_logits=logits)


def test_likelihood_ranking_by_hand(monkeypatch):
    """Two views decode B (colour 5 everywhere), one decodes A (all background): votes pick B; the likelihood
    under every view picks A, whose value is worked out by hand."""
    a, b = G([0, 0], [0, 0]), G([5, 5], [5, 5])
    item = EvalItem("t", 0, (Pair(G([1]), G([1])), Pair(G([2]), G([2]))), G([3, 3], [3, 3]), a)
    vs = views(3, seed=0)
    decoded = []  # (grid in the task's own frame, log-prob) per view, in the view order

    def stand_in(model, prompts, **kw):
        return [Generation([], v.grid(g), lp, 1) for v, (g, lp) in zip(vs, decoded)]

    monkeypatch.setattr(E, "generate_batched", stand_in)
    results = {}
    for rank in ("votes", "likelihood", "both"):
        decoded = [(b, -1.0), (b, -1.0), (a, -1.0)]
        results[rank], _ = evaluate_items(PrefersZero(), [item], n_views=3, rank=rank)
    assert [r.grid.tolist() for r in results["votes"][0].ranked] == [b.tolist(), a.tolist()]
    assert [r.grid.tolist() for r in results["both"][0].ranked] == [b.tolist(), a.tolist()]  # votes decide first
    ranked = results["likelihood"][0].ranked
    assert [r.grid.tolist() for r in ranked] == [a.tolist(), b.tolist()]
    # A under any view is "0 0 ROW 0 0 END": four zeros and two other tokens, log Z = log(e^10 + 47)
    log_z = np.log(np.exp(10.0) + VOCAB_SIZE - 1)
    assert ranked[0].likelihood == pytest.approx(3 * (4 * (10 - log_z) + 2 * -log_z), rel=1e-5)
    assert ranked[1].likelihood == pytest.approx(3 * 6 * -log_z, rel=1e-5)  # B: no zero at all
    # with equal votes, "both" lets the likelihood decide before the decoder's own (higher for B) log-prob
    decoded = [(b, -0.5), (a, -1.0)]
    tied = {rank: evaluate_items(PrefersZero(), [item], n_views=2, rank=rank)[0][0].ranked for rank in
            ("votes", "both")}
    assert [r.votes for r in tied["both"]] == [1, 1]
    assert tied["votes"][0].grid.tolist() == b.tolist() and tied["both"][0].grid.tolist() == a.tolist()


@given(grids(1, 6), st.integers(0, 2 ** 16))
def test_a_candidate_is_scored_as_each_view_would_write_it(g, seed):
    """The scored sequence under view v is v's prompt followed by v(candidate): decoding it and mapping it back
    with v's inverse gives the candidate again."""
    model = PrefersZero()
    item = EvalItem("t", 0, (Pair(G([1, 2]), G([2, 1])),), G([3]), None)
    vs = views(4, seed=seed)
    candidate_likelihoods(model, [([(v, item.prompt(v).tokens) for v in vs], [g])])
    rows = [row for batch in model.seen for row in batch.numpy()]
    assert len(rows) == len(vs)
    for v in vs:  # two views can show this tiny task alike: then either of their rows may be v's
        prompt = item.prompt(v).tokens
        answers = [decode_answer(r[len(prompt):]) for r in rows if np.array_equal(r[:len(prompt)], prompt)]
        answer = next((a for a in answers if np.array_equal(a, v.grid(g))), None)
        assert answer is not None and np.array_equal(v.invert_grid(answer), g)


def test_the_report_marks_the_answers_ttt_changed():
    from dyntrm.evaluate import ItemResult
    from dyntrm.report import results_html
    from dyntrm.scoring import vote

    item = lambda i: EvalItem("t", i, (), G([1]), G([2]))  # noqa: E731
    result = lambda i, g: ItemResult(item(i), vote([(g, 0.0)]), [], [1], [g, g])  # noqa: E731
    before = [result(0, G([1])), result(1, G([1])), result(2, G([2]))]
    after = [result(0, G([2])), result(1, G([1])), result(2, G([3]))]  # 0 gained, 1 unchanged, 2 lost
    page = results_html(after, before)
    assert page.count("changed by TTT") == 2
    assert "changed by TTT (was not solved)" in page and "changed by TTT (was solved)" in page
    assert "changed by TTT" not in results_html(after)  # nothing to compare with: no marks


# ------------------------------------------------------------------------------------------------ command line

def test_negative_ttt_steps_are_refused_before_loading_anything(tmp_path, capsys):
    for cmd in (["eval", str(tmp_path)], ["predict", str(tmp_path), str(TASKS / "flip_lr.json")]):
        assert main([*cmd, "--ttt-steps", "-3"]) == 2
        err = capsys.readouterr().err
        assert "--ttt-steps -3: must be >= 0" in err and len(err.strip().splitlines()) == 1


def test_eval_and_predict_with_ttt_write_its_fields(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "debug", "--source", str(TASKS), "--set", "data.train_splits=",
                 "--set", "data.demo_splits=all", "--set", "data.eval_split=all", "--set", "train.steps=2",
                 "--out", str(run)]) == 0
    assert main(["eval", str(run), "--views", "1", "--ttt-steps", "2", "--ttt-params", "routing", "--rank", "both",
                 "--no-ttt-colours", "--ttt-sizes", "copy", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["ttt_steps"] == 2 and m["ttt_params"] == "routing" and m["ttt_tasks"] == 6 and m["rank"] == "both"
    assert m["ttt_colours"] is False and m["ttt_sizes"] == "copy"  # the defaults are on / checkpoint
    assert m["ttt_seconds_per_task"] > 0 and m["ttt_single_demo_tasks"] == 0 and m["ttt_trained_numbers"] > 0
    assert m["ttt_mode"] == "view" and "TTT 2 steps per view of routing" in capsys.readouterr().out
    answers = tmp_path / "answers.json"
    assert main(["predict", str(run), str(TASKS / "flip_lr.json"), "--views", "1", "--ttt-steps", "1",
                 "--out", str(answers)]) == 0
    assert list(json.loads(answers.read_text())) == ["flip_lr"] and "TTT 1 steps per view" in capsys.readouterr().out


def test_ttt_defaults_are_the_measured_best():
    """Under --ttt-steps, colours are permuted and the checkpoint writes the sizes unless told otherwise
    (BENCHMARKS ttt-sizes, ttt-demo4-sizes); the off forms parse."""
    import argparse

    from dyntrm.cli import add_ttt_options, ttt_of

    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    add_ttt_options(p)
    on, off = ttt_of(p.parse_args([])), ttt_of(p.parse_args(["--no-ttt-colours", "--ttt-sizes", "copy"]))
    assert (on.colours, on.sizes, on.shape_loss) == (True, "checkpoint", True) == (TTT(1).colours, TTT(1).sizes,
                                                                                   TTT(1).shape_loss)
    assert (off.colours, off.sizes) == (False, "copy") and on.steps == 2  # eval and predict adapt by default
