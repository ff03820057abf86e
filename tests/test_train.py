"""Training: loss pieces by hand, exact resume, atomic checkpoints, faults, DDP and accumulation equivalence,
golden losses."""

import gc
import json
import os
import sys
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from dyntrm import checkpoint
from dyntrm.config import from_dict, to_dict
from dyntrm.data.batching import collate
from dyntrm.runtime import Runtime
from dyntrm.loss import act_targets
from dyntrm.model.moe import SparsityController
from dyntrm.train import Trainer, TrainingStopped, lr_factor, train
from helpers import ASSETS, CPU, assert_close_by_norm, debug_cfg, params


def test_act_targets_by_hand():
    # steps x samples: sample 0 correct at steps 2 and 3 (of 4), sample 1 never, sample 2 only at step 1
    correct = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    halt, cont = act_targets(correct, gamma=0.9)
    assert halt.tolist() == correct.float().tolist()
    # continue_t = 0.9 * max over later steps
    want = torch.tensor([[0.9, 0, 0.9], [0.9, 0, 0], [0.9, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(cont, want)


def test_l1_controller_by_hand():
    remoe = SparsityController(target=2.0, factor=2.0)
    two_sided = SparsityController(target=2.0, factor=2.0, floor=0.01)
    # ReMoE (no floor): x factor above the target, / factor below, never negative
    assert remoe.next_coef(0.04, 3.0) == 0.08
    assert remoe.next_coef(0.04, 1.0) == 0.02
    # two-sided: the penalty decays to the floor, turns into a growing reward, which is dropped at the target
    seq, c = [], 0.04
    for active in (1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 1.0):
        c = two_sided.next_coef(c, active)
        seq.append(c)
    assert seq == pytest.approx([0.02, 0.01, -0.01, -0.02, -0.04, 0.01, 0.02, 0.04, 0.02])
    # bounded in magnitude on both sides, and held at an exact tie
    assert SparsityController(2.0, 2.0, 0.01, cap=0.5).next_coef(-0.3, 1.0) == -0.5
    assert SparsityController(2.0, 2.0, 0.01, cap=0.5).next_coef(0.3, 3.0) == 0.5
    assert SparsityController(2.0, 2.0, cap=0.5).next_coef(0.3, 3.0) == 0.5
    assert two_sided.next_coef(-0.3, 2.0) == -0.3
    # factor 1 (the recipe's train.l1_factor=1): a fixed coefficient on either side of the target, a reward too
    fixed = SparsityController(target=2.0, factor=1.0, floor=0.01)
    assert [fixed.next_coef(c, a) for c in (0.01, -0.02) for a in (0.5, 3.0)] == [0.01, 0.01, -0.02, -0.02]


def test_l1_controller_stays_one_sided_where_a_reward_cannot_act():
    """Under meta_only (routers get no main-loss gradient) and with a target of the whole library, activity below
    the target cannot be raised by a reward: the coefficient must not turn negative and grow."""
    for override in ("shaping.meta_only=true", "model.ffn_active=4"):  # debug: 4 FFN experts
        tr = Trainer(debug_cfg("shaping.kind=sars", override, "train.l1_init=0.5", "train.l1_max=0.5"), CPU)
        with torch.no_grad():
            tr.model.block.ffn.gate.fill_(3.0)  # activity well below any target
        stream = tr.data.iterate()
        for _ in range(3):
            m = tr.step(tr.micro_batches(stream)[0])
            assert m["active_experts"] < tr.cfg.model.ffn_active
            assert 0 < tr.state.l1_coef < 0.5, override


def test_lr_schedule_warmup_then_cosine():
    # worked by hand: (s + 1) / warmup during warm-up, times a cosine that is 1 at the start, halfway between 1 and
    # the floor 0.1 at mid-run (cos(pi/2) = 0) and the floor at the end
    cfg = debug_cfg("train.steps=100", "train.warmup=10", "train.min_lr_ratio=0.1")
    f = [lr_factor(cfg, s, 0.0) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[50] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[10:], f[11:]))  # decays strictly after warm-up
    # under a time budget progress is the elapsed fraction of it, whatever the step: at 0 s the warm-up alone
    timed = debug_cfg("train.steps=100", "train.warmup=10", "train.min_lr_ratio=0.1", "train.time_budget_s=60")
    assert [lr_factor(timed, s, 0.0) for s in (0, 4, 9, 30)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert lr_factor(timed, 20, 30.0) == pytest.approx(0.55) and lr_factor(timed, 3, 60.0) == pytest.approx(0.04)


def test_loss_falls_and_run_directory(tmp_path):
    cfg = debug_cfg("train.steps=30")
    tr, last = train(cfg, tmp_path, rt=CPU, live=False)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.8 * losses[0]
    assert any(r["kind"] == "epoch" for r in records)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 30
    assert "git" in json.loads((tmp_path / "run.json").read_text())
    ck = checkpoint.load(tmp_path)
    assert ck["meta"]["step"] == 30 and not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])


class Boom(RuntimeError):
    pass


def _on_step(monkeypatch, n, action):
    """Make ``action()`` happen at the start of the n-th ``Trainer.step`` (counting from 1); returns the real one."""
    real = Trainer.step
    calls = {"n": 0}

    def step(self, micro):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(self, micro)

    monkeypatch.setattr(Trainer, "step", step)
    return real


def _ctrl_c():
    """A real SIGINT: the step it arrives in still finishes."""
    import signal

    os.kill(os.getpid(), signal.SIGINT)


def _boom():
    raise Boom()


def test_exact_resume_after_interrupt_and_after_a_crash(tmp_path, monkeypatch):
    cfg = debug_cfg("train.steps=8", "train.save_every=3")
    straight, _ = train(cfg, tmp_path / "a", rt=CPU, live=False)
    # Ctrl-C during step 5: the step finishes, a checkpoint of step 5 is saved, the run stops, then resumes
    real = _on_step(monkeypatch, 5, _ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", rt=CPU, live=False)
    monkeypatch.setattr(Trainer, "step", real)
    assert checkpoint.load(tmp_path / "b")["meta"]["step"] == 5
    resumed, _ = train(cfg, tmp_path / "b", rt=CPU, live=False, resume=True)
    # a crash during step 5 without any save: resume from the periodic checkpoint of step 3
    _on_step(monkeypatch, 5, _boom)
    with pytest.raises(Boom):
        train(cfg, tmp_path / "c", rt=CPU, live=False)
    monkeypatch.setattr(Trainer, "step", real)
    assert checkpoint.load(tmp_path / "c")["meta"]["step"] == 3
    crashed, _ = train(cfg, tmp_path / "c", rt=CPU, live=False, resume=True)
    want = params(straight.model)
    for other in (resumed, crashed):
        got = params(other.model)
        assert all(torch.equal(want[k], got[k]) for k in want), "parameters differ after resume"
        assert all(torch.equal(straight.ema.shadow[k], other.ema.shadow[k]) for k in want)
        assert other.state.step == straight.state.step and other.state.l1_coef == straight.state.l1_coef
        assert (other.state.epoch, other.state.batch) == (straight.state.epoch, straight.state.batch)


def test_progress_curriculum_resumes_exactly(tmp_path, monkeypatch):
    """data.curriculum: the epochs' shares are logged (small first, then 1), and a run interrupted mid-curriculum
    resumes onto the same stream: the same weights and data position as the unbroken run."""
    cfg = debug_cfg("train.steps=10", "train.save_every=3", "data.curriculum=0.6", "data.tokens_per_batch=512")
    straight, _ = train(cfg, tmp_path / "a", rt=CPU, live=False)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["curriculum_share"] for r in records if r["kind"] == "epoch"]
    assert shares[0] == 0.05 and shares[-1] == 1.0 and shares == sorted(shares) and len(shares) >= 3
    real = _on_step(monkeypatch, 4, _boom)  # a crash during step 4: resume from step 3's checkpoint
    with pytest.raises(Boom):
        train(cfg, tmp_path / "b", rt=CPU, live=False)
    monkeypatch.setattr(Trainer, "step", real)
    resumed, _ = train(cfg, tmp_path / "b", rt=CPU, live=False, resume=True)
    want, got = params(straight.model), params(resumed.model)
    assert all(torch.equal(want[k], got[k]) for k in want), "parameters differ after resume"
    s, r = straight.state, resumed.state
    assert (s.step, s.epoch, s.batch, s.share) == (r.step, r.epoch, r.batch, r.share)


def test_checkpoint_write_is_atomic_and_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    cfg = debug_cfg("train.steps=2")
    tr, _ = train(cfg, tmp_path, rt=CPU, live=False)
    good = checkpoint.latest(tmp_path)
    tr.state.step = 99

    def full(fd):  # where a full disk shows on a write that the page cache took: at fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        tr.save()
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("model.safetensors")
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", good.name]
    assert checkpoint.load(tmp_path)["meta"]["step"] == 2


def test_non_finite_steps_are_skipped_then_stop_with_the_checkpoint_before_them(tmp_path, monkeypatch):
    """No checkpoint is saved during a streak of non-finite steps, so pruning (train.keep=1 here) never deletes the
    last one before it; the message names it, and the run resumes from it."""
    import dyntrm.train as T

    cfg = debug_cfg("train.steps=10", "train.max_bad_steps=3", "train.save_every=2", "train.keep=1")
    real = T.compute_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, parts = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in (3, 5, 6, 7):  # one isolated bad step, then three in a row
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(T, "compute_loss", poisoned)
    before = tmp_path / "checkpoints" / "step_0000004"  # the streak runs over the periodic save of step 6
    with pytest.raises(TrainingStopped, match=f"3 non-finite steps in a row at step 7 .*newest checkpoint, from "
                                              f"before them, is {before}"):
        train(cfg, tmp_path, rt=CPU, live=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [before.name]
    ck = checkpoint.load(tmp_path)
    assert ck["meta"]["step"] == 4 and ck["meta"]["train_state"]["bad_in_row"] == 0
    assert ck["meta"]["train_state"]["bad_total"] == 1  # the isolated one
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    monkeypatch.setattr(T, "compute_loss", real)  # the cause is gone: resume from it, to the end
    tr, _ = train(cfg, tmp_path, rt=CPU, live=False, resume=True)
    assert tr.state.step == 10 and checkpoint.load(tmp_path)["meta"]["step"] == 10


def test_without_a_checkpoint_before_the_streak_the_message_says_so(tmp_path, monkeypatch):
    import dyntrm.train as T

    real = T.compute_loss
    monkeypatch.setattr(T, "compute_loss", lambda *a, **k: (lambda l, p: (l * float("nan"), p))(*real(*a, **k)))
    with pytest.raises(TrainingStopped, match="no checkpoint was saved before them"):
        train(debug_cfg("train.max_bad_steps=2", "train.save_every=1"), tmp_path, rt=CPU, live=False)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step_*"))


def _first_batches(cfg, n):
    tr = Trainer(cfg, CPU)
    plan = tr.data.epoch(0)
    seqs = [s for b in plan.batches for _, s in b][:n]
    return seqs


def _record_grads(tr):
    """Wrap the optimizer so that the gradients it applies (after all-reduce, shaping and clipping) are kept."""
    seen = []
    real, model = tr.optimizer.step, tr.model  # not `tr`: a cycle through it would outlive `del tr` (see below)

    def step(*a, **k):
        seen.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return real(*a, **k)

    tr.optimizer.step = step
    return seen


def _ddp_worker(rank, world, init_file, cfg_dict, seqs, out_path):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = from_dict(cfg_dict)
        tr = Trainer(cfg, Runtime(torch.device("cpu"), rank, world))
        grads = _record_grads(tr)
        per = len(seqs) // world
        mine = seqs[rank * per:(rank + 1) * per]
        for _ in range(2):
            tr.step([collate(mine)])
        if rank == 0:
            torch.save({"params": params(tr.model), **{f"grads{i}.{k}": v for i, g in enumerate(grads)
                                                         for k, v in g.items()}}, out_path)
        del tr  # DDP's reducer must go before its process group, or gloo aborts the process at exit
        gc.collect()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # Leave without the interpreter's finalisation: a CI run once saw a rank abort (SIGABRT, "terminate called
    # without an active exception", from C++ destructors) after its work was done, failing a test whose results
    # were all written. Errors above still surface: they raise before this line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("shaping", ["none", "sars", "fars"])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, shaping):
    # clipping too: it must see the all-reduced gradient; SARS on every token (its subsample is per rank)
    cfg = debug_cfg("train.grad_clip=0.5", f"shaping.kind={shaping}", "shaping.token_rate=1")
    seqs = _first_batches(cfg, 4)
    one = Trainer(cfg, CPU)
    grads = _record_grads(one)
    for _ in range(2):
        one.step([collate(seqs)])
    init = tempfile.mktemp(dir=tmp_path)
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, init, to_dict(cfg), seqs, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    # The first applied gradients agree to float precision (routing ones include the SARS / FARS terms), measured
    # against each tensor's norm: the summation order differs between one process and gloo's all-reduce, and on
    # some processors a near-zero element then differs by ~10% of itself (2.5e-7 on block.attn.proto); a routing
    # logit within float noise of 0 can also switch its ReLU, so routing gradients agree to ~1e-4 of their norm.
    # A wrong normalisation or a missing all-reduce is off by O(1) ...
    for i, g in enumerate(grads[:1]):
        for k, v in g.items():
            assert_close_by_norm(two[f"grads{i}.{k}"], v, 1e-3, f"step {i} gradient of {k}")
    # ... and so do the updates two steps on (Adam's first steps turn float noise on near-zero gradients into
    # element differences of up to ~lr x 0.1, so the update of each tensor is compared by norm)
    start = params(Trainer(cfg, CPU).model)
    for k, v in params(one.model).items():
        assert_close_by_norm(two["params"][k] - start[k], v - start[k], 1e-2, f"update of {k}")


@pytest.mark.parametrize("shaping", ["none", "sars"])
def test_accumulation_equals_one_big_batch(shaping):
    cfg = debug_cfg(f"shaping.kind={shaping}", "shaping.token_rate=1")
    seqs = _first_batches(cfg, 4)
    big = Trainer(cfg, CPU)
    m_big = big.step([collate(seqs)])
    acc = Trainer(debug_cfg("train.accum=2", f"shaping.kind={shaping}", "shaping.token_rate=1"), CPU)
    m_acc = acc.step([collate(seqs[:1]), collate(seqs[1:])])  # unequal halves: normalisation must be global
    assert m_acc["loss"] == pytest.approx(m_big["loss"], rel=1e-5)
    start = params(Trainer(cfg, CPU).model)
    for k, v in params(big.model).items():  # Adam's first step is ~lr x sign(g): compare each update by its norm
        assert_close_by_norm(params(acc.model)[k] - start[k], v - start[k], 1e-3, f"update of {k}")


@pytest.mark.parametrize("variant", ["dyn", "dynmoe", "dense"])
def test_the_ffn_controller_acts_in_every_variant_with_dynmoe(variant):
    """After a step the FFN's L1 coefficient is what the controller makes of the step's active count (in dynmoe
    as in dyn: it once moved under dyn only, leaving dynmoe's penalty fixed at l1_init); without DynMoE it stays."""
    cfg = debug_cfg(f"model.variant={variant}")
    tr = Trainer(cfg, CPU)
    coef = tr.state.l1_coef
    m = tr.step([tr.data.epoch(0).batch(0, tr.data.items)])
    want = SparsityController.for_config(cfg).next_coef(coef, m["active_experts"]) if variant != "dense" else coef
    assert tr.state.l1_coef == want
    if variant != "dense":
        assert want != coef


def test_attention_sparsity_controller_and_penalty():
    """model.attn_active: the loss gains the attention routers' L1 term, and their own controller moves its own
    coefficient toward the target (above it at initialisation, where 2 x the target are active)."""
    from dyntrm.loss import compute_loss, global_counts

    cfg = debug_cfg("model.attn_active=1.5")
    assert SparsityController.for_config(cfg, "attn").target == 1.5
    tr = Trainer(cfg, CPU)
    batch = tr.data.epoch(0).batch(0, tr.data.items)
    counts = global_counts([batch], CPU)
    out = tr.model(batch.tokens, batch.attention_mask, batch.prompt_end)
    without, _ = compute_loss(out, batch, cfg, 0.01, counts, 0.0)
    with_, parts = compute_loss(out, batch, cfg, 0.01, counts, 0.5)
    torch.testing.assert_close(with_ - without, 0.5 * parts["attn_l1"])
    assert float(parts["attn_l1"]) > 0
    m = tr.step([batch])
    assert 1.5 < m["attn_active_experts"] <= 3.0 + 1e-6
    assert tr.state.attn_l1_coef == pytest.approx(cfg.train.l1_init * cfg.train.l1_factor)
    assert tr.state.l1_coef != tr.state.attn_l1_coef or m["active_experts"] > cfg.model.ffn_active


def _changed_by_hand(tokens: list[int]) -> set[int]:
    """Positions of the output cells whose colour differs from the input's at the same (row, col), read back from
    the token stream alone (pairs of one shape; the size header, if any, skipped)."""
    from dyntrm.data.tokens import END, IN, OUT, ROW, SIZE0

    def cells(a, b):  # positions of the cells between a and b, as (row, col) -> position
        out, r, c = {}, 0, 0
        for i in range(a, b):
            if tokens[i] == ROW:
                r, c = r + 1, 0
            elif tokens[i] < SIZE0:
                out[(r, c)] = i
                c += 1
        return out

    found = set()
    for i, t in enumerate(tokens):
        if t == IN:
            o = tokens.index(OUT, i)
            if END not in tokens[o:]:
                continue
            e = tokens.index(END, o)
            inp, out = cells(i + 1, o), cells(o + 1, e)
            if set(inp) == set(out):
                found |= {out[rc] for rc in out if tokens[out[rc]] != tokens[inp[rc]]}
    return found


def _first_output_by_hand(tokens: list[int]) -> set[int]:
    """Positions of the first pair's output tokens (after its OUT, up to and with its END), if a later pair follows."""
    from dyntrm.data.tokens import END, IN, OUT

    o = tokens.index(OUT)
    e = tokens.index(END, o)
    return set(range(o + 1, e + 1)) if IN in tokens[e:] else set()


@pytest.mark.parametrize("over,sw,cw,fw", [(("train.structure_weight=3",), 3.0, 1.0, 1.0),
                                            (("train.structure_weight=3", "train.change_weight=2"), 3.0, 2.0, 1.0),
                                            (("train.structure_weight=0",), 0.0, 1.0, 1.0),
                                            (("train.first_output_weight=0",), 1.0, 1.0, 0.0),
                                            (("train.change_weight=2", "train.first_output_weight=0.5"),
                                             1.0, 2.0, 0.5)])
def test_structure_and_change_weights_scale_their_tokens_only(over, sw, cw, fw):
    """train.structure_weight, train.change_weight and train.first_output_weight: the LM loss is (Σ other cells' CE
    + ws · Σ shape-token CE + wc · Σ changed cells' CE) / targets, every token of the first demonstration's output
    further x wf, each step's sum from the logits by a plain per-position loop; the shape tokens are the size
    header, ROW and END; the changed cells and the first output are read back from the token stream by hand."""
    from dyntrm.data.tokens import END, ROW, SIZE0
    from dyntrm.loss import compute_loss, global_counts

    cfg = debug_cfg(*over, "train.act_weight=0")
    tr = Trainer(cfg, CPU)
    batch = tr.data.epoch(0).batch(0, tr.data.items)
    counts = global_counts([batch], CPU)
    with torch.no_grad():
        out = tr.model(batch.tokens, batch.attention_mask, batch.prompt_end)
        got, parts = compute_loss(out, batch, cfg, 0.0, counts)
    S = out.logits.shape[0]
    changed = [_changed_by_hand(row.tolist()) for row in batch.tokens]
    first = [_first_output_by_hand(row.tolist()) for row in batch.tokens]
    want, plain_last, n, kinds, n_first = 0.0, 0.0, 0, set(), 0
    for s in range(S):
        for b, t in torch.nonzero(batch.target[:, 1:]).tolist():
            tok = int(batch.tokens[b, t + 1])
            ce = float(-torch.log_softmax(out.logits[s, b, t].double(), -1)[tok])
            shape = tok == ROW or tok == END or tok >= SIZE0
            kind = "shape" if shape else "changed" if t + 1 in changed[b] else "cell"
            kinds.add(kind)
            in_first = t + 1 in first[b]
            n_first += s == 0 and in_first
            want += ce * {"shape": sw, "changed": cw, "cell": 1.0}[kind] * (fw if in_first else 1.0) / S
            plain_last += ce if s == S - 1 else 0.0
            n += s == 0
    assert kinds == {"shape", "changed", "cell"} and n == int(counts.targets) and 0 < n_first < n
    assert float(got) == pytest.approx(want / n, rel=1e-5)
    assert float(parts["lm_last_sum"]) == pytest.approx(plain_last, rel=1e-5)  # the logged CE stays unweighted


def test_first_output_weight_never_touches_the_answer():
    """A sequence whose query is its only pair has no first demonstration: train.first_output_weight=0 leaves its
    loss as it is, while on a sequence with a demonstration it lowers it (the demonstration's CE is gone)."""
    import numpy as np

    from dyntrm.data.arc import Pair
    from dyntrm.data.tokens import encode
    from dyntrm.loss import compute_loss, global_counts

    g = np.array([[1, 2], [3, 4]], np.uint8)
    lone = collate([encode([Pair(g, g[::-1])], header=True)], ["t"])
    two = collate([encode([Pair(g, g.T), Pair(g, g[::-1])], header=True)], ["t"])
    losses = {}
    for fw in ("1", "0"):
        cfg = debug_cfg("train.act_weight=0", f"train.first_output_weight={fw}")
        torch.manual_seed(0)
        model = Trainer(cfg, CPU).model
        with torch.no_grad():
            for name, b in (("lone", lone), ("two", two)):
                out = model(b.tokens, b.attention_mask, b.prompt_end)
                losses[name, fw] = float(compute_loss(out, b, cfg, 0.0, global_counts([b], CPU))[0])
    assert losses["lone", "0"] == pytest.approx(losses["lone", "1"], rel=1e-6)
    assert losses["two", "0"] < losses["two", "1"] * 0.9


@pytest.mark.parametrize("over", [(), ("train.grad_steps=2", "model.input_injection=true")])
def test_step_checkpointing_gives_the_same_step_and_captures_once(over):
    """train.checkpoint_steps: each trained step runs again in the backward (counted), and the step's loss,
    SARS meta loss, routing statistics and updated weights are those without checkpointing. SARS raises on a
    second capture of a (step, module), and its statistics would double."""
    cfg = debug_cfg("shaping.token_rate=1", *over)
    plain, ckpt = Trainer(cfg, CPU), Trainer(debug_cfg("shaping.token_rate=1", "train.checkpoint_steps=true", *over),
                                              CPU)
    batch = plain.data.epoch(0).batch(0, plain.data.items)
    calls = []
    ckpt.model.block.register_forward_pre_hook(lambda mod, args: calls.append(1))
    m_plain, m_ckpt = plain.step([batch]), ckpt.step([batch])
    N, trained = cfg.model.max_steps, cfg.model.max_steps - plain.detach_steps
    assert len(calls) == N + trained
    for k in ("loss", "lm", "meta_loss", "active_q", "active_ffn", "entropy_v", "grad_norm"):
        assert m_ckpt[k] == pytest.approx(m_plain[k], rel=1e-6), k
    for k, v in params(plain.model).items():
        torch.testing.assert_close(params(ckpt.model)[k], v, rtol=1e-6, atol=1e-7, msg=k)


GOLDEN = ASSETS / "golden_losses.json"


def test_golden_losses(tmp_path):
    """The first 10 losses of `debug` on tests/assets/tasks. Regenerate only on purpose:
    DYNTRM_REGEN_GOLDEN=1 pytest tests/test_train.py -k golden (and say why in the commit)."""
    cfg = debug_cfg("train.steps=10", "train.threads=1")
    tr = Trainer(cfg, CPU)
    stream = tr.data.iterate()
    losses = [tr.step(tr.micro_batches(stream)[0])["loss"] for _ in range(10)]
    if os.environ.get("DYNTRM_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": "tests/helpers.py debug_cfg + train.steps=10",
                                      "losses": losses}, indent=2) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    # The first loss is a forward pass (float precision); later ones carry Adam's amplification of summation-order
    # noise on near-zero gradients, which differs between processors: 1e-3 still catches any change of behaviour.
    assert losses[0] == pytest.approx(want[0], rel=1e-5)
    assert losses == pytest.approx(want, rel=1e-3)


def test_evaluation_inside_training_is_logged(tmp_path, monkeypatch):
    import dyntrm.train as T
    from dyntrm.data.dataset import split_items
    from dyntrm.evaluate import metrics_of

    cfg = debug_cfg("train.steps=4", "train.eval_every=2", "train.eval_tasks=2")
    seen, real = [], T.evaluate_items

    def spy(model, items, **kw):
        seen.append((params(model), [(it.task_id, it.index) for it in items], kw["n_views"]))
        return real(model, items, **kw)

    monkeypatch.setattr(T, "evaluate_items", spy)
    tr, _ = train(cfg, tmp_path, rt=CPU, live=False)
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    # a fixed subset: the first train.eval_tasks test inputs of the eval split, 1 view
    first = [(it.task_id, it.index) for it in split_items(cfg, max_side=cfg.data.max_side)[:2]]
    assert [(ids, views) for _, ids, views in seen] == [(first, 1), (first, 1)]
    # the last evaluation saw the EMA weights of the end of the run (not the raw ones), and logged its figures
    weights, ema, raw = seen[-1][0], tr.ema.state_dict(), params(tr.model)
    assert all(torch.equal(weights[k], ema[k]) for k in ema) and not all(torch.equal(weights[k], raw[k]) for k in raw)
    m = metrics_of(*real(tr.ema_model(), split_items(cfg, limit=2, max_side=cfg.data.max_side), n_views=1,
                         max_len=cfg.data.max_len))
    keys = ("pass@1", "pass@2", "n_test_inputs", "mean_steps")
    assert {k: evals[-1][k] for k in keys} == {k: m[k] for k in keys}


def test_resume_refuses_a_changed_model_or_data(tmp_path):
    from dyntrm.config import ConfigError

    train(debug_cfg("train.steps=2"), tmp_path, rt=CPU, live=False)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match="data.max_len"):
        train(debug_cfg("train.steps=4", "data.max_len=256"), tmp_path, rt=CPU, live=False, resume=True)
    assert (tmp_path / "config.json").read_text() == before  # a refused resume touches nothing
    tr, _ = train(debug_cfg("train.steps=3"), tmp_path, rt=CPU, live=False, resume=True)  # train.* may change
    assert tr.state.step == 3


def test_saving_a_step_twice_keeps_the_complete_checkpoint(tmp_path):
    tr, _ = train(debug_cfg("train.steps=2"), tmp_path, rt=CPU, live=False)
    first = checkpoint.latest(tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert tr.save() == first and (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_compiled_block_with_sars_equals_eager_and_never_traces_the_tap():
    """torch.compile of the block (dynamo with the eager backend: same kernels, so results match) with SARS on:
    identical training, and the routing tap always runs outside the traced graph (tracing it made dynamo guard on
    the capture dict and recompile every step until its limit, seen on an H200)."""
    import torch._dynamo

    traced = []

    def run(compiled: bool):
        torch._dynamo.reset()
        tr = Trainer(debug_cfg("shaping.kind=sars", "shaping.token_rate=1.0"), CPU)
        observe = tr.shaper.observe
        tr.shaper.observe = lambda *a, **k: (traced.append(torch.compiler.is_compiling()), observe(*a, **k))[1]
        if compiled:
            tr.model.block.compile(backend="eager")
        stream = tr.data.iterate()
        losses = [tr.step(tr.micro_batches(stream)[0])["lm"] for _ in range(3)]
        return losses, params(tr.model)

    eager_losses, eager_params = run(False)
    losses, got = run(True)
    torch._dynamo.reset()
    assert traced and not any(traced)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for k in eager_params:
        torch.testing.assert_close(got[k], eager_params[k], rtol=1e-4, atol=1e-5, msg=k)


def test_init_fine_tunes_from_a_checkpoints_ema_weights_and_refuses_another_model(tmp_path):
    from dyntrm.checkpoint import CheckpointError
    from dyntrm.config import ConfigError

    src = tmp_path / "src"
    train(debug_cfg("train.steps=3", "train.ema_decay=0.5", "train.l1_factor=2.0"), src, rt=CPU, live=False)
    ck = checkpoint.load(src, state=False)
    carried = ck["meta"]["train_state"]["l1_coef"]
    assert carried != debug_cfg().train.l1_init  # the controller moved: carrying it over is a real choice
    # the fine-tune's first weights, and its EMA's, are the checkpoint's EMA (what evaluation uses), not its raw
    # weights; its controller goes on from the checkpoint's coefficient; the optimizer and the step start afresh
    tr = Trainer(debug_cfg(f"train.init={src}", "train.ema_decay=0.5", "train.l1_factor=2.0"), CPU)
    assert tr.state.step == 0 and not tr.optimizer.state and tr.state.l1_coef == carried
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])  # the two differ: a real choice
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, ck["ema"][k]), k
    for k, v in tr.ema.state_dict().items():
        assert torch.equal(v, ck["ema"][k]), k
    # under another controller (here a fixed coefficient) the carried value would mean something else: l1_init
    assert Trainer(debug_cfg(f"train.init={src}", "train.l1_factor=1.0"), CPU).state.l1_coef == \
        debug_cfg().train.l1_init
    ft = tmp_path / "ft"
    tr2, _ = train(debug_cfg(f"train.init={src}", "train.steps=2"), ft, rt=CPU, live=False)
    assert tr2.state.step == 2 and checkpoint.load(ft)["meta"]["step"] == 2
    import shutil

    shutil.rmtree(src)  # a resumed fine-tune continues from its own checkpoint: the init is not read again
    tr3, _ = train(debug_cfg(f"train.init={src}", "train.steps=3"), ft, rt=CPU, live=False, resume=True)
    assert tr3.state.step == 3
    with pytest.raises(CheckpointError, match="no complete checkpoint|no such"):
        Trainer(debug_cfg(f"train.init={src}"), CPU)
    train(debug_cfg("train.steps=1"), src, rt=CPU, live=False)
    with pytest.raises(ConfigError, match="model.d_model"):  # a model of another width: named, not a shape dump
        Trainer(debug_cfg(f"train.init={src}", "model.d_model=64"), CPU)
