"""CUDA figures: bf16 and torch.compile against fp32 eager on the same inputs, and a timed `base` training step
(tokens/s, model FLOP/s as a fraction of this card's measured bf16 matmul rate). Run by gpu_check.sh.

    python benchmarks/gpu_step.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, table  # noqa: E402

from dyntrm.config import apply_overrides, preset  # noqa: E402
from dyntrm.model import ArcTransformer  # noqa: E402
from dyntrm.model.info import model_info  # noqa: E402
from dyntrm.runtime import Runtime  # noqa: E402
from dyntrm.train import Trainer  # noqa: E402


def cuda_time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    rate = 2 * n ** 3 / cuda_time(lambda: a @ b, 10)

    # parity on the same inputs: fp32 eager is the reference
    cfg = preset("base")
    torch.manual_seed(0)
    model = ArcTransformer(cfg.model).to(dev)
    x = torch.randint(0, 17, (4, 1024), device=dev)
    with torch.no_grad():
        ref = model(x).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x).logits.float()
        model.block.compile()
        compiled = model(x).logits.float()
    rel = lambda t: float((t - ref).norm() / ref.norm())  # noqa: E731

    # a timed base training step (bf16 autocast, compiled block)
    tcfg = apply_overrides(preset("base"), ["data.max_side=30", "data.max_len=8192", "data.tokens_per_batch=65536",
                                            "train.compile=true", "train.bf16=true"])
    tr = Trainer(tcfg, Runtime(dev))
    plan = tr.data.epoch(0)
    batch = max((plan.batch(i, tr.data.items) for i in range(min(len(plan), 8))), key=lambda bt: bt.n_tokens)
    batch = batch.to(dev)
    step_s = cuda_time(lambda: tr.step([batch]), 5)
    ctx = float(batch.attention_mask.sum(1).float().mean())
    flops = 3 * tcfg.model.max_steps * batch.n_tokens * model_info(tcfg.model, int(ctx))["flops_per_token_step"]
    fig = {"gpu": torch.cuda.get_device_name(), "bf16_matmul_tflops": rate / 1e12,
           "bf16_rel_err": rel(bf16), "compile_rel_err": rel(compiled),
           "base_step_seconds": step_s, "base_tokens_per_s": batch.n_tokens / step_s,
           "base_frac_of_bf16_matmul": flops / step_s / rate, "batch_shape": list(batch.tokens.shape)}
    rows = [["bf16 matmul rate (reference)", f"{rate / 1e12:.0f} TFLOP/s"],
            ["bf16 autocast vs fp32 eager, logits relative error", f"{fig['bf16_rel_err']:.2e}"],
            ["compiled block vs fp32 eager, logits relative error", f"{fig['compile_rel_err']:.2e}"],
            [f"base training step {fig['batch_shape']} (bf16, compiled block, SARS)", f"{step_s * 1e3:.0f} ms"],
            ["  tokens / s", f"{fig['base_tokens_per_s']:.0f}"],
            ["  model FLOP/s / bf16 matmul rate", f"{fig['base_frac_of_bf16_matmul']:.1%}"]]
    text = table([f"CUDA check on {fig['gpu']}", "figure"], rows)
    finish("gpu", text, fig, write=not args.no_write)


if __name__ == "__main__":
    main()
