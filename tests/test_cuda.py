"""CUDA-only checks (skipped without a GPU; run by benchmarks/gpu_check.sh): bf16 autocast and torch.compile
against fp32 eager on the same inputs, the grouped-GEMM expert path, the fused (Triton) composition against the
per-expert reference and the other paths (values and gradients, fp32 and bf16), CUDA-graph decoding against eager
decoding, step checkpointing, compiled bf16 training steps. (The KV-cache test runs on CUDA too: test_model.py,
parametrised by device and marked ``cuda`` there.)"""

import numpy as np
import pytest
import torch

from dyntrm.config import preset
from dyntrm.model import ArcTransformer, ExpertLibrary
from dyntrm.model import fused
from dyntrm.model.generate import generate
from dyntrm.runtime import Runtime
from dyntrm.train import Trainer
from helpers import debug_cfg

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


def _model(name="tiny", **kw):
    cfg = preset(name).model
    cfg.variant = "dyn"  # both libraries: the CUDA paths of each are under test
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return ArcTransformer(cfg).to(DEV)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_autocast_close_to_fp32():
    m = _model()
    x = torch.randint(0, 17, (4, 300), device=DEV)
    ref = m(x).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = m(x).logits
    assert torch.isfinite(got).all() and _rel(got, ref) < 3e-2


def test_compiled_block_matches_eager():
    m = _model()
    x = torch.randint(0, 17, (2, 200), device=DEV)
    ref = m(x).logits
    m.block.compile()
    got = m(x).logits
    assert _rel(got, ref) < 1e-4
    assert not any("_orig_mod" in k for k in m.state_dict())


def test_grouped_mm_bf16_equals_expert_loop():
    m = _model()
    lib = m.ffn_expert_library
    counts = torch.full((lib.n_experts,), 3, device=DEV)
    counts[1] = 0  # an expert with no rows
    x = torch.randn(int(counts.sum()), lib.d_in, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = lib.grouped(x, counts)
    ref = lib.grouped(x, counts)  # fp32: the loop path
    assert _rel(got, ref) < 3e-2


def test_compiled_bf16_training_steps_are_finite_and_learn():
    cfg = debug_cfg("train.compile=true", "train.bf16=true", "train.steps=8")
    tr = Trainer(cfg, Runtime(DEV))
    stream = tr.data.iterate()
    losses = [tr.step(tr.micro_batches(stream)[0])["lm"] for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- fused composition

def _compose_case(E, d_in, hid, d_out, C, N, seed=0):
    torch.manual_seed(seed)
    lib = ExpertLibrary(E, d_in, hid, d_out).to(DEV)
    lib.init_weights(out_std=(2.0 / E) ** 0.5 * (2.0 / hid) ** 0.5)
    x = torch.randn(N, d_in, device=DEV)
    w = torch.relu(torch.randn(N, C, E, device=DEV))
    return lib, x, w


def _reference(lib, x, w, g):
    """The per-expert loop in float64: the composition and its gradients for x, w, w1, w2."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    w1, w2 = lib.w1.detach().double().requires_grad_(), lib.w2.detach().double().requires_grad_()
    out = torch.stack([sum(w64[:, c, e:e + 1] * (torch.nn.functional.silu(x64 @ w1[e]) @ w2[e])
                           for e in range(w.shape[2])) for c in range(w.shape[1])], 1)
    return out, torch.autograd.grad(out, [x64, w64, w1, w2], g.double())


def _run(lib, x, w, g, path):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = lib.compose(x, w, path=path)
    return out, torch.autograd.grad(out, [x, w, lib.w1, lib.w2], g.to(out.dtype))


@pytest.mark.skipif(not fused.fits(8, 8, 8), reason="needs Triton")
@pytest.mark.parametrize("shape", [(16, 32, 32, 32, 2, 1000), (64, 64, 64, 64, 3, 777), (5, 20, 128, 12, 1, 130)])
def test_fused_composition_fp32_equals_reference_and_experts_path(shape):
    """IEEE fp32 dots: the fused kernels against the float64 per-expert loop, values and all four gradients, for
    power-of-two and odd widths up to MAX_WIDTH, C = 1..3, row counts that leave a partial block. (Each new shape
    autotunes the kernels: seconds each.)"""
    E, d_in, hid, d_out, C, N = shape
    lib, x, w = _compose_case(*shape)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # torch's default: the kernels use IEEE dots
    g = torch.randn(N, C, d_out, device=DEV)
    ref, ref_grads = _reference(lib, x, w, g)
    for path in ("fused", "experts", "manual", "gemm"):
        out, grads = _run(lib, x, w, g, path)
        assert _rel(out, ref) < 1e-5, path
        for name, a, b in zip(("x", "w", "w1", "w2"), grads, ref_grads):
            assert _rel(a, b) < 1e-5, (path, name)


@pytest.mark.skipif(not fused.fits(8, 8, 8), reason="needs Triton")
def test_fused_composition_bf16_autocast_close_to_reference():
    """Under bf16 autocast the fused path computes in bf16 with fp32 accumulation: no further from the float64
    reference than the ``experts`` path under the same autocast (which rounds each expert's output to bf16)."""
    lib, x, w = _compose_case(64, 64, 64, 64, 3, 4096, seed=1)
    g = torch.randn(4096, 3, 64, device=DEV)
    ref, ref_grads = _reference(lib, x, w, g)
    errs = {}
    for path in ("fused", "experts"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, grads = _run(lib, x, w, g, path)
        assert out.dtype == torch.bfloat16 and all(torch.isfinite(t).all() for t in grads)
        errs[path] = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads)]
    for f, e in zip(errs["fused"], errs["experts"]):
        assert f < 2e-2 and f < 2 * e + 1e-3, errs


@pytest.mark.skipif(not fused.fits(8, 8, 8), reason="needs Triton")
def test_model_uses_the_fused_path_on_cuda_and_matches_the_experts_path(monkeypatch):
    m = _model()
    x = torch.randint(0, 17, (2, 100), device=DEV)
    paths = []
    real = ExpertLibrary.compose

    def spy(self, x_ND, w_NCE, chunk=None, path=None):
        from dyntrm.model.experts import default_compose_path
        paths.append(path or default_compose_path(x_ND, self))
        return real(self, x_ND, w_NCE, chunk, path)

    monkeypatch.setattr(ExpertLibrary, "compose", spy)
    got = m(x).logits
    assert set(paths) == {"fused"}
    monkeypatch.setattr(ExpertLibrary, "compose", lambda self, x_ND, w_NCE, chunk=None, path=None:
                        real(self, x_ND, w_NCE, chunk, "experts"))
    assert _rel(got, m(x).logits) < 1e-5


# ---------------------------------------------------------------------------------------------- decoding, memory

def test_cuda_graph_decoding_equals_eager_token_for_token():
    """generate() replaying a captured decoding step (re-captured as finished samples leave the batch) writes the
    same answers as eager decoding: same tokens, log-probabilities equal to float noise."""
    torch.manual_seed(0)
    cfg = preset("debug").model
    cfg.grid_coords = "origin"
    m = ArcTransformer(cfg).to(DEV).eval()
    with torch.no_grad():  # make samples halt at different steps
        m.block.halt.weight.normal_(0, 2.0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 17, size=int(rng.integers(20, 60))) for _ in range(12)]
    eager = generate(m, prompts, max_new=40, cuda_graphs=False)
    graphs = generate(m, prompts, max_new=40, cuda_graphs=True)
    assert len({g.steps for g in eager}) > 1  # several halting steps, so several step layouts
    for a, b in zip(eager, graphs):
        assert a.tokens == b.tokens and a.steps == b.steps
        assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-4)


def test_step_checkpointing_on_cuda_bf16_gives_the_same_step():
    """bf16, SARS on: the same loss and update with train.checkpoint_steps (atomic adds make CUDA sums differ in
    the last bits between the two forwards)."""
    losses, weights = {}, {}
    for ckpt in (False, True):
        cfg = debug_cfg("train.bf16=true", f"train.checkpoint_steps={str(ckpt).lower()}")
        tr = Trainer(cfg, Runtime(DEV))
        batch = tr.data.epoch(0).batch(0, tr.data.items).to(DEV)
        losses[ckpt] = tr.step([batch])["loss"]
        weights[ckpt] = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert _rel(weights[True], weights[False]) < 1e-3


@pytest.mark.parametrize("bf16", [False, True])
def test_ttt_copies_side_by_side_on_cuda_match_one_at_a_time(bf16):
    """--ttt-copies on CUDA (vmap over stacked weights, CopiesDispatch, SDPA under vmap), fp32 and bf16 autocast:
    each copy ends near where it ends adapted alone on the same device."""
    from dataclasses import replace

    from dyntrm.data.dataset import split_items
    from dyntrm.ttt import TTT, Job

    cfg = debug_cfg("model.variant=dyn")
    torch.manual_seed(0)
    model = ArcTransformer(cfg.model).to(DEV).eval()
    items = split_items(debug_cfg())
    a, b = items[0], next(it for it in items if it.task_id != items[0].task_id)
    jobs = [Job(a.task_id, tuple(a.demos)), Job(b.task_id, tuple(b.demos))]
    ttt = TTT(steps=3, lr=1e-2, recipe=replace(cfg.train, bf16=bf16))
    together, records = ttt.adapt_copies(model, jobs)
    base = dict(model.named_parameters())
    for job, m in zip(jobs, together):
        alone, _ = ttt.adapt(model, job.task_id, job.demos)
        ref, got = dict(alone.named_parameters()), dict(m.named_parameters())
        for k in ref:
            delta_ref, delta = ref[k] - base[k], got[k] - base[k]
            if delta_ref.norm() > 0:
                assert _rel(delta, delta_ref) < (0.05 if bf16 else 1e-3), k
