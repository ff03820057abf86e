"""Evaluation: voting and pass@k by hand, exact inverse mapping, constrained decoding, cached == uncached."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dyntrm.evaluate as E
from dyntrm.config import preset
from dyntrm.data.arc import Pair, Task
from dyntrm.data.augment import views
from dyntrm.data.dataset import EvalItem, eval_items
from dyntrm.data.tokens import END, N_TOKENS, OUT, PAD, ROW, SIZE0, decode_answer, encode_prompt
from dyntrm.evaluate import evaluate_items, metrics_of, submission_of
from dyntrm.model import ArcTransformer
from dyntrm.model.generate import DecodeState, Generation, GridConstraint, generate
from dyntrm.scoring import attempts, copy_input_reference, paired_gain, score, vote

G = lambda *rows: np.array(rows, dtype=np.uint8)  # noqa: E731


def test_vote_ranks_by_votes_then_logprob_then_bytes():
    a, b, c = G([1, 2]), G([3]), G([4, 4], [4, 4])
    ranked = vote([(a, -0.5), (b, -0.1), (a, -0.9), (None, 0.0), (c, -0.1), (b, -0.2)])
    # a and b have 2 votes each; b's best mean log-prob (-0.1) beats a's (-0.5); c has one vote
    assert [r.votes for r in ranked] == [2, 2, 1]
    assert np.array_equal(ranked[0].grid, b) and np.array_equal(ranked[1].grid, a)
    assert [np.array_equal(x, y) for x, y in zip(attempts(ranked), [b, a])] == [True, True]
    # an exact tie falls back to the grid bytes: deterministic whatever the input order
    t1 = vote([(G([5]), -1.0), (G([6]), -1.0)])
    t2 = vote([(G([6]), -1.0), (G([5]), -1.0)])
    assert [r.grid.tolist() for r in t1] == [r.grid.tolist() for r in t2]
    # one candidate: attempt 2 repeats it; none: a 1x1 stand-in
    assert [g.tolist() for g in attempts(vote([(a, 0.0)]))] == [[[1, 2]], [[1, 2]]]
    assert [g.tolist() for g in attempts(vote([(None, 0.0)]))] == [[[0]], [[0]]]


def test_pass_at_k_by_hand_with_several_test_inputs():
    t = {"A": [G([1]), G([2])], "B": [G([3])], "C": [G([4])]}
    sub = {
        "A": [{"attempt_1": [[1]], "attempt_2": [[9]]},  # solved at 1
              {"attempt_1": [[9]], "attempt_2": [[2]]}],  # solved at 2 only
        "B": [{"attempt_1": [[0]], "attempt_2": [[0]]}],  # not solved
        # C missing from the submission: scores 0
    }
    s = score(sub, t)
    assert s["tasks"]["A"] == {"pass@1": 0.5, "pass@2": 1.0, "shape@1": 1.0, "cells@1": 0.5}
    assert s["tasks"]["B"] == {"pass@1": 0.0, "pass@2": 0.0, "shape@1": 1.0, "cells@1": 0.0}
    assert s["tasks"]["C"]["pass@2"] == 0.0 and s["tasks"]["C"]["shape@1"] == 0.0
    assert s["pass@1"] == pytest.approx(0.5 / 3) and s["pass@2"] == pytest.approx(1 / 3)
    assert s["shape@1"] == pytest.approx(2 / 3) and s["cells@1"] == pytest.approx(0.5 / 3)


def test_partial_credit_by_hand():
    target = G([1, 2], [3, 4])
    sub = {"A": [{"attempt_1": [[1, 2], [3, 0]], "attempt_2": [[1, 2], [3, 4]]},  # 3 of 4 cells; solved at 2
                 {"attempt_1": [[1, 2, 0], [3, 4, 0]], "attempt_2": [[0]]}]}  # wrong shape: 0 cells
    s = score(sub, {"A": [target, target]})
    assert s["tasks"]["A"] == {"pass@1": 0.0, "pass@2": 0.5, "shape@1": 0.5, "cells@1": 0.375}
    # a stand-in entry (no model answer) earns no diagnostic credit, even where its shape would match
    one = G([0])
    stand_in = {"B": [{"attempt_1": [[0]], "attempt_2": [[0]]}]}
    assert score(stand_in, {"B": [one]})["shape@1"] == 1.0
    s = score(stand_in, {"B": [one]}, no_answer=frozenset({("B", 0)}))
    assert s["shape@1"] == 0.0 and s["cells@1"] == 0.0 and s["pass@2"] == 1.0  # ARC's metric is unchanged


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.0, 0.5, 1.0])), min_size=1,
                max_size=30), st.integers(0, 2 ** 16))
def test_paired_gain_is_a_percentile_bootstrap_over_tasks(pairs, seed):
    before, after = [a for a, _ in pairs], [b for _, b in pairs]
    gain, lo, hi = paired_gain(before, after, resamples=300, seed=seed)
    n = len(pairs)
    assert gain == pytest.approx(sum(b - a for a, b in pairs) / n)
    # the reference: a plain loop over the same draws, each draw's mean gain, the 2.5% and 97.5% quantiles
    draws = np.random.default_rng(seed).integers(0, n, size=(300, n))
    means = sorted(sum(after[j] - before[j] for j in row) / n for row in draws)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert min(b - a for a, b in pairs) - 1e-12 <= lo <= hi <= max(b - a for a, b in pairs) + 1e-12


def test_paired_gain_by_hand_and_on_bad_input():
    assert paired_gain([0, 1, 0], [0, 1, 0]) == (0.0, 0.0, 0.0)  # no task changed: no gain, no spread
    assert paired_gain([0, 0], [1, 1]) == (1.0, 1.0, 1.0)  # every task gained one
    gain, lo, hi = paired_gain([0] * 40, [1] * 4 + [0] * 36)  # 4 of 40 tasks gained: 0.1, clearly above 0
    assert gain == pytest.approx(0.1) and 0.0 < lo < 0.1 < hi
    gain, lo, hi = paired_gain([0] * 40, [1] + [0] * 39)  # one of 40: the interval reaches 0
    assert lo == 0.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_gain([0, 1], [1])
    with pytest.raises(ValueError, match="level"):
        paired_gain([0], [1], level=1.5)
    with pytest.raises(ValueError, match="finite"):
        paired_gain([0, None], [1, 1])
    with pytest.raises(ValueError, match="resamples"):
        paired_gain([0], [1], resamples=0)


def test_copy_input_reference_by_hand():
    demos = (Pair(G([0]), G([0])),)
    items = [EvalItem("A", 0, demos, G([1, 2]), G([1, 2])),  # the answer is the input: solved
             EvalItem("A", 1, demos, G([1, 2]), G([1, 0])),  # same shape, half the cells
             EvalItem("B", 0, demos, G([5]), G([5, 5])),  # other shape
             EvalItem("C", 0, demos, G([5]), None)]  # no target: not scored
    ref = copy_input_reference(items)
    assert ref == pytest.approx({"pass@1": 0.25, "pass@2": 0.25, "shape@1": 0.5, "cells@1": 0.375})


def _tasks():
    rng = np.random.default_rng(0)
    grid = lambda h, w: rng.integers(0, 10, (h, w)).astype(np.uint8)  # noqa: E731
    return [Task(f"t{i}", tuple(Pair(grid(2, 3), grid(3, 2)) for _ in range(2)),
                 tuple(Pair(grid(2, 4), grid(4, 3)) for _ in range(1 + i % 2))) for i in range(4)]


def test_inverse_mapping_with_a_stand_in_that_answers_the_augmented_target(monkeypatch):
    items = eval_items(_tasks())
    answers = {}  # prompt bytes -> the target as it looks under that view
    task_index = {t: i for i, t in enumerate(dict.fromkeys(it.task_id for it in items))}
    for it in items:
        for v in views(8, seed=task_index[it.task_id]):  # a task's test inputs share its views
            answers[it.prompt(v).tokens.tobytes()] = v.grid(it.target)

    def stand_in(model, prompts, **kw):
        outs = []
        for p in prompts:
            g = answers[np.asarray(p).tobytes()]
            outs.append(Generation([], g, -1.0, 1))
        return outs

    monkeypatch.setattr(E, "generate_batched", stand_in)
    for n_views in (1, 8):
        results, stats = evaluate_items(None, items, n_views=n_views)
        m = metrics_of(results, stats)
        assert m["pass@1"] == 1.0 and m["pass@2"] == 1.0
        assert all(r.ranked[0].votes == n_views for r in results)  # every view agrees after un-augmenting


def test_submission_round_trips_through_an_independent_scorer(tmp_path, monkeypatch):
    items = eval_items(_tasks())
    # stand-in: always [[7]] (wrong); one test input is then given the right attempt by hand below
    def stand_in(model, prompts, **kw):
        return [Generation([], G([7]), -1.0, 1) for _ in prompts]

    monkeypatch.setattr(E, "generate_batched", stand_in)
    results, stats = evaluate_items(None, items, n_views=2)
    results[1].attempts = [items[1].target, G([7])]  # make one test input right at attempt 1
    sub = submission_of(results)
    path = tmp_path / "submission.json"
    path.write_text(json.dumps(sub))
    loaded = json.loads(path.read_text())

    # an independent scorer, written here from the ARC Prize rules
    by_task = {}
    for it in items:
        by_task.setdefault(it.task_id, []).append(it.target.tolist())
    total = 0.0
    for tid, targets in by_task.items():
        assert len(loaded[tid]) == len(targets)  # one entry per test input, in order
        hits = sum(any(e[k] == tgt for k in ("attempt_1", "attempt_2")) for e, tgt in zip(loaded[tid], targets))
        total += hits / len(targets)
    assert metrics_of(results, stats)["pass@2"] == pytest.approx(total / len(by_task))
    assert total > 0


def test_grid_constraint_state_machine():
    c = GridConstraint(1, 32, torch.device("cpu"))
    seq = [1, 2, ROW, 3]  # a row of 2, then one cell of the second row
    for t in seq:
        assert c.allowed()[0, t]
        c.update(torch.tensor([t]))
    a = c.allowed()[0]
    assert not a[ROW] and not a[END] and a[:10].all()  # the second row must reach width 2 first
    c.update(torch.tensor([4]))
    a = c.allowed()[0]
    assert a[ROW] and a[END] and not a[:10].any()  # full: close the row or the grid
    c.update(torch.tensor([END]))
    assert c.done[0] and c.allowed()[0].tolist() == [i == PAD for i in range(32)]


def _random_model(seed, bias_token=None, header=False):
    """A debug-sized model with sharp random preferences; ``header``: model.size_header with its grid coordinates
    (the recipe), else the specification's plain serialisation, whose prompts the tests below write by hand."""
    torch.manual_seed(seed)
    cfg = preset("debug").model
    cfg.size_header, cfg.grid_coords = header, ("borders" if header else "off")
    m = ArcTransformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 3.0)  # sharp, arbitrary preferences
        if bias_token is not None:  # push hard toward one token to stress the constraint
            m.lm_head.weight[bias_token] += 50 * m.norm.weight.sign()
    return m


@given(st.integers(0, 10_000), st.sampled_from([None, ROW, END, OUT, PAD, 3, N_TOKENS, SIZE0, SIZE0 + 29]),
       st.booleans())
@settings(max_examples=16, deadline=None)
def test_constrained_decoding_is_always_a_well_formed_grid(seed, bias, header):
    m = _random_model(seed, bias, header)
    demo = Pair(np.array([[5], [6]]), np.array([[7, 8]]))
    prompts = [encode_prompt([], np.array([[1, 2]]), header=header).tokens,
               encode_prompt([demo], np.array([[1]]), header=header).tokens]
    for g in generate(m, prompts):
        assert g.grid is not None and 1 <= g.grid.shape[0] <= 30 and 1 <= g.grid.shape[1] <= 30
        assert g.tokens[-1] == END
        np.testing.assert_array_equal(decode_answer(g.tokens, header=header), g.grid)


def _uncached_greedy(model, prompt, steps, max_new):
    """The reference: a full forward over the whole sequence for every generated token."""
    seq = list(prompt)
    con = GridConstraint(1, model.cfg.vocab_size, torch.device("cpu"))
    out = []
    for _ in range(max_new):
        logits = model(torch.tensor([seq]), halt=True, steps=steps).final_logits[0, -1]
        tok = int(logits.masked_fill(~con.allowed()[0], float("-inf")).argmax())
        out.append(tok)
        con.update(torch.tensor([tok]))
        seq.append(tok)
        if tok == END:
            break
    return out


def test_cached_and_uncached_decoding_give_the_same_answers(monkeypatch):
    m = _random_model(5)
    prompts = [np.array([11, 13, 1, 2, ROW, 3, 4, OUT]), np.array([11, 13, 9, OUT]),
               np.array([11, 13, 5, 5, 5, OUT, 1, 1, 1, 15, 13, 2, 2, OUT]), np.array([11, 13, 7, 7, OUT])]
    kept = []
    real_keep = DecodeState.keep
    monkeypatch.setattr(DecodeState, "keep", lambda self, idx: (kept.append(idx.tolist()), real_keep(self, idx))[1])
    # each sample its own step count (as ACT would decide at prefill); compact early: rows leave the batch
    gens = generate(m, prompts, max_new=40, compact=0.0, steps=torch.tensor([3, 1, 2, 1]))
    for p, g in zip(prompts, gens):
        ref = _uncached_greedy(m, p, torch.tensor([g.steps]), 40)
        assert g.tokens == ref
    assert [g.steps for g in gens] == [3, 1, 2, 1] and kept  # different step counts, and rows did leave the batch


def test_sampling_is_reproducible_and_stays_well_formed():
    m = _random_model(7)
    p = [np.array([11, 13, 1, OUT])] * 4
    a = generate(m, p, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(0))
    b = generate(m, p, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(0))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert all(g.grid is not None for g in a)


def test_per_sample_side_limits_hold():
    m = _random_model(11, bias_token=3)  # pushes toward colours: grids grow as large as allowed
    prompts = [np.array([11, 13, 1, OUT])] * 3
    gens = generate(m, prompts, max_sides=[1, 4, 30])
    assert gens[0].grid.shape == (1, 1)
    assert max(gens[1].grid.shape) <= 4 and max(gens[2].grid.shape) <= 30


def _square(side, colour=1):
    return np.full((side, side), colour, np.uint8)


def test_a_prompt_too_long_loses_its_largest_demonstrations_until_every_view_fits():
    small, large = Pair(_square(2), _square(2, 2)), Pair(_square(5), _square(1))  # 8 cells, 26 cells
    item = EvalItem("t", 0, (small, large, small), _square(3), None)
    vs = views(4, seed=0)
    full = max(len(item.prompt(v)) for v in vs)
    without_large = max(len(EvalItem("t", 0, (small, small), _square(3), None).prompt(v)) for v in vs)
    bare = max(len(EvalItem("t", 0, (), _square(3), None).prompt(v)) for v in vs)
    assert bare < without_large < full
    (f,) = E.fit_prompts([item], 4, 0, without_large, header=False)
    assert f.dropped == 1 and f.length == full and f.fitted_length == without_large
    assert all(len(e) <= without_large for _, e in f.prompts) and len(f.prompts) == 4
    assert [len(e) for _, e in f.prompts] == [len(EvalItem("t", 0, (small, small), _square(3), None).prompt(v))
                                              for v in vs]  # the large one went, both small ones stayed
    (f,) = E.fit_prompts([item], 4, 0, without_large - 1, header=False)  # equals: the last one goes first
    assert f.dropped == 2 and f.fitted_length == max(len(EvalItem("t", 0, (small,), _square(3), None).prompt(v))
                                                     for v in vs)
    (f,) = E.fit_prompts([item], 4, 0, bare - 1, header=False)
    assert f.prompts == [] and f.dropped == 3 and f.fitted_length == bare
    (f,) = E.fit_prompts([item], 4, 0, None, header=False)
    assert f.dropped == 0 and f.fitted_length == full


def test_an_input_too_long_even_alone_is_answered_with_itself_and_counted():
    """The model is not asked (no decoding happens for it); its submission entry is its input, not a 1x1 grid."""
    cfg = preset("debug").model
    cfg.size_header, cfg.grid_coords = False, "off"  # the token counts below are of the plain serialisation
    model = ArcTransformer(cfg)
    model.cfg.max_positions = 932 + 24  # room for a 24-token prompt and a full answer
    short = EvalItem("a", 0, (Pair(_square(2), _square(2)),), _square(2), _square(2))  # a 21-token prompt
    shortened = EvalItem("b", 0, (Pair(_square(3), _square(3)),), _square(2), _square(1))  # 33; 8 alone
    too_long = EvalItem("c", 0, (Pair(_square(1), _square(1)),), _square(5, 3), _square(1))  # 37; 32 alone
    results, stats = evaluate_items(model, [short, shortened, too_long], n_views=2, cap_to_prompt=True)
    assert (stats["prompts_shortened"], stats["too_long"], stats["sequences"]) == (1, 1, 4)
    assert [(r.dropped, r.too_long) for r in results] == [(0, False), (1, False), (1, True)]
    assert all(np.array_equal(a, too_long.input) for a in results[2].attempts)
    m = metrics_of(results, stats)
    assert m["tasks"]["c"]["tests"][0]["too_long"] and m["tasks"]["b"]["tests"][0]["demos_dropped"] == 1
    line = E.score_line(m)
    assert "1 prompts too long for the model lost demonstrations" in line and "1 test inputs too long" in line
