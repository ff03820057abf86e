"""CUDA figures, each printed as soon as it is measured (a run cut short still shows what it reached). Run by
gpu_check.sh:

1. bf16 and torch.compile against fp32 eager on the same inputs (logits' relative error);
2. the attention composition's paths (experts, gemm, fused) at the preset's shapes, bf16 forward + backward, as
   a fraction of this card's measured bf16 matmul rate;
3. timed `base` training steps, bf16 eager: plain and with train.checkpoint_steps (tokens/s, model FLOP/s as a
   fraction of the matmul rate, peak memory); optionally with the compiled block (--compile-step);
4. KV-cached decoding throughput at 64 inputs x 8 views (512 sequences), eager and replayed as CUDA graphs.

    python benchmarks/gpu_step.py [--tokens-per-batch 32768] [--no-write]
    python benchmarks/gpu_step.py --device cpu --preset debug --no-write   # smoke test of this script, no GPU

A training batch that does not fit the card is halved until it does (reported in the table).
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, finish, table  # noqa: E402

from dyntrm.config import ConfigError, apply_overrides, preset  # noqa: E402
from dyntrm.model import ArcTransformer, ExpertLibrary, fused  # noqa: E402
from dyntrm.model.experts import COMPOSE_PATHS, default_compose_path  # noqa: E402
from dyntrm.model.generate import DecodeGraph  # noqa: E402
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


def train_step_time(name: str, overrides: list[str], tokens: int, dev: torch.device, reps: int,
                    profile: bool = False):
    """Seconds per optimizer step of one training batch of about ``tokens`` tokens (halved on OOM while the
    config still accepts the smaller batch); with ``profile``, then the kernels of one more step by device time."""
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
            if profile:
                print_profile(lambda: tr.step([batch]), dev)
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


def print_profile(fn, dev: torch.device, rows: int = 25) -> None:
    """Where one call of ``fn`` spends its time: the top operators / kernels by self device (CPU: host) time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def parity(name: str, dev: torch.device) -> tuple[float, float]:
    """Relative error of the logits under bf16 autocast and with the compiled block, fp32 eager the reference."""
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    # both libraries (variant dyn, whatever the preset's default), so that every composition path is compared
    model = ArcTransformer(dataclasses.replace(preset(name).model, variant="dyn")).to(dev)
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


def compose_paths(name: str, tokens: int, dev: torch.device, rate: float, reps: int) -> dict[str, float]:
    """Forward + backward of the attention composition for ``tokens`` tokens (every head), each path as a
    fraction of the matmul rate (model FLOPs: the experts' two GEMMs and the Q/K/V sums, x3)."""
    mc = preset(name).model
    H, d, E, F_ = mc.n_heads, mc.d_head, mc.attn_experts, mc.attn_expert_hidden
    torch.manual_seed(0)
    lib = ExpertLibrary(E, d, F_, d).to(dev)
    lib.init_weights(out_std=(2 / E) ** 0.5 * (2 / F_) ** 0.5)
    rows = tokens * H
    x = torch.randn(rows, d, device=dev, requires_grad=True)
    w = torch.relu(torch.randn(rows, 3, E, device=dev)).requires_grad_()
    flops = 3 * rows * (2 * 2 * d * F_ * E + 3 * 2 * E * d)
    fracs = {}
    for path in COMPOSE_PATHS:
        if path == "fused" and not fused.fits(d, F_, d):
            say(compose_fused="skipped: no Triton or no CUDA")
            continue

        def run():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = lib.compose(x, w, path=path)
            out.backward(torch.ones_like(out))
            x.grad = w.grad = lib.w1.grad = lib.w2.grad = None
        try:
            fracs[path] = flops / timed(run, reps, dev) / rate
        except Exception as e:  # report, go on to the other paths
            say(**{f"compose_{path}_failed": f"{type(e).__name__}: {e}"})
            continue
        say(**{f"compose_{path}_frac_of_matmul": fracs[path]})
    return fracs


@torch.no_grad()
def decode_rates(name: str, dev: torch.device, batch: int = 512, prompt: int = 300, new: int = 64
                 ) -> dict[str, float]:
    """Tokens/s of KV-cached decoding, ``batch`` sequences (64 inputs x 8 views) of ``prompt`` tokens through all
    N steps, ``new`` tokens each: eager, and replayed as a CUDA graph (capture included). Prefill not counted."""
    torch.manual_seed(0)
    model = ArcTransformer(preset(name).model).to(dev).eval()
    prompts = torch.randint(0, 17, (batch, prompt), device=dev)
    lengths = torch.full((batch,), prompt, device=dev)
    steps = torch.full((batch,), model.cfg.max_steps, device=dev)
    rates = {}
    for mode in ("eager", "graph") if dev.type == "cuda" else ("eager",):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits, state = model.prefill(prompts, lengths, new, steps=steps)
            sync(dev)
            t0 = time.perf_counter()
            step = DecodeGraph(model, state) if mode == "graph" else lambda t: model.decode(t, state)
            for _ in range(new):
                logits = step(logits.argmax(-1))
            sync(dev)
        rates[mode] = batch * new / (time.perf_counter() - t0)
        say(**{f"decode_{mode}_tokens_per_s": rates[mode]})
    return rates


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-parity", action="store_true", help="skip the bf16 / compile parity check (timings only)")
    ap.add_argument("--compile-step", action="store_true", help="also time the step with the compiled block")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one plain training step")
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

    # the composition's paths at the preset's shapes (16384 tokens; 1024 for a CPU smoke test)
    fracs = compose_paths(args.preset, 16384 if cuda else 256, dev, rate, args.reps)

    # timed training steps (SARS on, as the preset says), bf16 eager: plain, with step checkpointing, compiled
    base = ["data.max_side=30", f"train.bf16={str(cuda).lower()}"]
    variants = {"plain": ["train.compile=false"], "checkpointed": ["train.checkpoint_steps=true"]}
    if args.compile_step:
        variants["compiled"] = [f"train.compile={str(cuda).lower()}"]
    steps, tokens = {}, args.tokens_per_batch
    for k, over in variants.items():
        try:  # later variants take the batch size the first settled on, so that all time the same batch
            tcfg, batch, s, peak = train_step_time(args.preset, base + over, tokens, dev, args.reps,
                                                   profile=args.profile and k == "plain")
        except Exception as e:  # report what was measured rather than nothing
            say(**{f"{k}_step_failed": f"{type(e).__name__}: {e}"})
            continue
        tokens = tcfg.data.tokens_per_batch
        ctx = float(batch.attention_mask.sum(1).float().mean())
        flops = 3 * tcfg.model.max_steps * batch.n_tokens * model_info(tcfg.model, int(ctx))["flops_per_token_step"]
        steps[k] = {"seconds": s, "peak_gib": peak, "tokens_per_s": batch.n_tokens / s,
                    "frac_of_matmul": flops / s / rate, "batch_shape": list(batch.tokens.shape),
                    "tokens": batch.n_tokens, "shaping": tcfg.shaping.kind}
        say(**{f"{k}_{m}": v for m, v in steps[k].items() if not isinstance(v, list)}, batch=steps[k]["batch_shape"])

    rates = decode_rates(args.preset, dev)
    lib_dims = preset(args.preset).model
    probe = torch.empty(1, lib_dims.d_head, device=dev)
    default = default_compose_path(probe, ExpertLibrary(1, lib_dims.d_head, lib_dims.attn_expert_hidden,
                                                        lib_dims.d_head))
    fig = {"gpu": gpu, "matmul_tflops": rate / 1e12, "bf16_rel_err": bf16_err, "compile_rel_err": compile_err,
           **{f"compose_{p}_frac_of_matmul": f for p, f in fracs.items()}, "compose_default_path": default,
           **{f"{k}_step_{m}": v for k, st in steps.items() for m, v in st.items()},
           **{f"decode_{k}_tokens_per_s": v for k, v in rates.items()}}
    say(**{k: v for k, v in fig.items() if not isinstance(v, list)})
    prec = "bf16" if cuda else "fp32"
    rows = [[f"{prec} matmul rate (reference, {n}^3)", f"{rate / 1e12:.1f} TFLOP/s"],
            ["bf16 autocast vs fp32 eager, logits relative error", f"{bf16_err:.2e}"],
            ["compiled block vs fp32 eager, logits relative error", f"{compile_err:.2e}"]]
    for p, f in fracs.items():
        rows.append([f"attention composition fwd+bwd, {p} path{' (default)' if p == default else ''}",
                     f"{f:.1%} of matmul rate"])
    for k, st in steps.items():
        what = {"plain": "eager", "checkpointed": "eager, train.checkpoint_steps", "compiled": "compiled block"}[k]
        rows += [[f"{args.preset} training step {st['batch_shape']} ({st['shaping']}), {prec} {what}",
                  f"{st['seconds'] * 1e3:.0f} ms, {st['tokens_per_s']:.0f} tok/s"],
                 ["  model FLOP/s / matmul rate", f"{st['frac_of_matmul']:.1%}"],
                 ["  peak GPU memory", f"{st['peak_gib']:.1f} GiB"]]
    for k, v in rates.items():
        rows.append([f"decoding, 64 inputs x 8 views, {k}", f"{v:.0f} tokens/s"])
    text = table([f"CUDA check on {gpu}", "figure"], rows)
    finish("gpu", text, fig, write=not args.no_write)


if __name__ == "__main__":
    main()
