"""CUDA-only checks (skipped without a GPU; run by benchmarks/gpu_check.sh): bf16 autocast and torch.compile
against fp32 eager on the same inputs, the grouped-GEMM expert path, a compiled bf16 training step. (The KV-cache
test runs on CUDA too: test_model.py, parametrised by device and marked ``cuda`` there.)"""

import pytest
import torch

from dyntrm.config import preset
from dyntrm.model import ArcTransformer
from dyntrm.runtime import Runtime
from dyntrm.train import Trainer
from helpers import debug_cfg

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


def _model(name="tiny", **kw):
    cfg = preset(name).model
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
