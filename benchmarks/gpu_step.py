"""CUDA figures: bf16 and torch.compile against fp32 eager on the same inputs, and a timed `base` training step
(tokens/s, model FLOP/s as a fraction of this card's measured bf16 matmul rate). Run by gpu_check.sh.

    python benchmarks/gpu_step.py [--tokens-per-batch 16384] [--no-write]
    python benchmarks/gpu_step.py --device cpu --preset debug --no-write   # smoke test of this script, no GPU

Each figure is printed as soon as it is measured, so a run cut short still shows what it reached. A training batch
that does not fit the card is halved until it does (reported in the table).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, finish, table  # noqa: E402

from dyntrm.config import ConfigError, apply_overrides, preset  # noqa: E402
from dyntrm.model import ArcTransformer  # noqa: E402
from dyntrm.model.info import model_info  # noqa: E402
from dyntrm.runtime import Runtime  # noqa: E402
from dyntrm.train import Trainer  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, dev: torch.device) -> float:
    """Median seconds of ``reps`` calls after one warm-up call (which also compiles)."""
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def say(**kw) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()), flush=True)


def is_oom(e: BaseException) -> bool:
    """Out of GPU memory, also when it arrives wrapped (inductor compiling or autotuning)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def train_step_time(name: str, overrides: list[str], tokens: int, dev: torch.device, reps: int):
    """Seconds per optimizer step of one training batch of about ``tokens`` tokens (halved on OOM while the
    config still accepts the smaller batch)."""
    while True:
        tcfg = apply_overrides(preset(name), overrides + [f"data.tokens_per_batch={tokens}"])
        tr = None
        try:
            tr = Trainer(tcfg, Runtime(dev))
            plan = tr.data.epoch(0)
            batch = max((plan.batch(i, tr.data.items) for i in range(min(len(plan), 8))), key=lambda b: b.n_tokens)
            batch = batch.to(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s = timed(lambda: tr.step([batch]), reps, dev)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")
            return tcfg, batch, s, peak
        except RuntimeError as e:
            if not is_oom(e):
                raise
            try:
                apply_overrides(preset(name), overrides + [f"data.tokens_per_batch={tokens // 2}"])
            except ConfigError:
                raise e from None  # no smaller batch holds the longest sequence
            say(oom_at_tokens_per_batch=tokens)
            tokens //= 2
        finally:
            del tr
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def parity(name: str, dev: torch.device) -> tuple[float, float]:
    """Relative error of the logits under bf16 autocast and with the compiled block, fp32 eager the reference."""
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = ArcTransformer(preset(name).model).to(dev)
    x = torch.randint(0, 17, (4, 1024 if cuda else 64), device=dev)
    with torch.no_grad():
        ref = model(x).logits.float()
        rel = lambda t: float((t.float() - ref).norm() / ref.norm())  # noqa: E731
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            bf16_err = rel(model(x).logits)
        say(bf16_rel_err=bf16_err)
        if cuda:
            model.block.compile()
        compile_err = rel(model(x).logits)
        say(compile_rel_err=compile_err)
    return bf16_err, compile_err


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-parity", action="store_true", help="skip the bf16 / compile parity check (timings only)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        assert torch.cuda.is_available(), "needs a CUDA device (or --device cpu for a smoke test)"
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 512
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    rate = 2 * n ** 3 / timed(lambda: a @ b, 10, dev)
    del a, b
    say(device=gpu, matmul_tflops=rate / 1e12)

    # parity on the same inputs: fp32 eager is the reference
    bf16_err = compile_err = float("nan")
    if not args.no_parity:
        bf16_err, compile_err = parity(args.preset, dev)

    # timed training steps (SARS on, as the preset says): bf16 eager, then bf16 with the compiled block
    base = ["data.max_side=30", f"train.bf16={str(cuda).lower()}"]
    eager_cfg, eager_batch, eager_s, eager_peak = train_step_time(args.preset, base + ["train.compile=false"],
                                                                  args.tokens_per_batch, dev, args.reps)
    say(eager_step_s=eager_s, eager_peak_gib=eager_peak, eager_batch=list(eager_batch.tokens.shape))
    try:  # the batch size eager settled on, so that both time the same batch
        tcfg, batch, step_s, peak = train_step_time(args.preset, base + [f"train.compile={str(cuda).lower()}"],
                                                    eager_cfg.data.tokens_per_batch, dev, args.reps)
    except Exception as e:  # report the eager figures rather than nothing, then fail
        say(compiled_step_failed=f"{type(e).__name__}: {e}")
        raise
    same = torch.equal(batch.tokens.cpu(), eager_batch.tokens.cpu())
    ctx = float(batch.attention_mask.sum(1).float().mean())
    flops = 3 * tcfg.model.max_steps * batch.n_tokens * model_info(tcfg.model, int(ctx))["flops_per_token_step"]
    fig = {"gpu": gpu, "matmul_tflops": rate / 1e12, "bf16_rel_err": bf16_err, "compile_rel_err": compile_err,
           "tokens_per_batch": tcfg.data.tokens_per_batch,
           "batch_shape": list(batch.tokens.shape), "batch_tokens": batch.n_tokens,
           "eager_step_seconds": eager_s, "step_seconds": step_s, "compile_speedup": eager_s / step_s,
           "tokens_per_s": batch.n_tokens / step_s, "frac_of_matmul": flops / step_s / rate,
           "peak_gib": peak, "shaping": tcfg.shaping.kind}
    say(**{k: v for k, v in fig.items() if not isinstance(v, list)})
    what = "bf16, compiled block" if cuda else "fp32 eager"
    which = "same batch" if same else f"batch {fig['batch_shape']}"
    rows = [[f"{'bf16' if cuda else 'fp32'} matmul rate (reference, {n}^3)", f"{rate / 1e12:.1f} TFLOP/s"],
            ["bf16 autocast vs fp32 eager, logits relative error", f"{bf16_err:.2e}"],
            ["compiled block vs fp32 eager, logits relative error", f"{compile_err:.2e}"],
            [f"{args.preset} training step, batch {list(eager_batch.tokens.shape)} ({fig['shaping']}), "
             f"{'bf16 ' if cuda else ''}eager",
             f"{eager_s * 1e3:.0f} ms"],
            [f"{args.preset} training step, {which}, {what}", f"{step_s * 1e3:.0f} ms"],
            ["  compiled / eager speed-up", f"{fig['compile_speedup']:.2f}x"],
            ["  tokens / s", f"{fig['tokens_per_s']:.0f}"],
            ["  model FLOP/s / matmul rate", f"{fig['frac_of_matmul']:.1%}"],
            ["  peak GPU memory", f"{peak:.1f} GiB"]]
    text = table([f"CUDA check on {gpu}", "figure"], rows)
    finish("gpu", text, fig, write=not args.no_write)


if __name__ == "__main__":
    main()
