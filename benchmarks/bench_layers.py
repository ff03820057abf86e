"""Layer and model speed at the `tiny` shapes, each as a ratio against a reference timed in the same run.

    python benchmarks/bench_layers.py [--quick]

1. DynSIHA+ forward + backward: model FLOP/s as a fraction of this machine's fp32 matmul rate, for the default
   composition path and the ``gemm`` path; vs a per-expert Python loop (the same maths); vs dense multi-head
   attention of the same width (the price of composition).
2. DynMoE at ~2 of 16 active experts vs all 16 experts computed densely, and vs one dense FFN of the same active
   width.
3. KV-cached generation of a 300-token answer vs recomputing the full sequence for every token.
4. ACT early exit: a batch halting after n of N steps vs always N.
5. A `tiny` training step (the preset as it is, SARS included; DynMoE's gates at the target active count):
   achieved model FLOP/s as a fraction of the matmul rate, and its time over the dense variant's on the same
   batch; beside it the step at initialisation, without SARS, and of the full DynTRM (``model.variant=dyn``);
6. Peak resident memory (RSS) of a process running that step, without and with train.checkpoint_steps.

Prints a table, writes it to BENCHMARKS.md (section "layers"), and ends with one JSON line of the figures.
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, finish, matmul_rate, rounds, table  # noqa: E402

from dyntrm.config import preset  # noqa: E402
from dyntrm.model import ArcTransformer  # noqa: E402
from dyntrm.model.attention import DenseAttention, DynSIHA  # noqa: E402
from dyntrm.model.context import AttnMask, StepContext  # noqa: E402
from dyntrm.model.experts import ExpertLibrary  # noqa: E402
from dyntrm.model.info import model_info  # noqa: E402
from dyntrm.model.layers import Rope  # noqa: E402
from dyntrm.model.moe import DenseFFN, DynMoE  # noqa: E402


def loop_compose(lib: ExpertLibrary, h_ND: torch.Tensor, w_NCE: torch.Tensor) -> torch.Tensor:
    """The reference: a Python loop over experts, each a pair of GEMMs, accumulating Q, K, V."""
    out = h_ND.new_zeros(h_ND.shape[0], w_NCE.shape[1], lib.d_out)
    for e in range(lib.n_experts):
        o = F.silu(h_ND @ lib.w1[e]) @ lib.w2[e]
        out = out + w_NCE[:, :, e:e + 1] * o[:, None, :]
    return out


def fwd_bwd(fn, *inputs):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None
    return run


def bench_attention(cfg, tokens: int, n_rounds: int) -> dict:
    torch.manual_seed(0)
    mc = cfg.model
    B, T = tokens // 512, 512
    H, dh, E, Fh = mc.n_heads, mc.d_head, mc.attn_experts, mc.attn_expert_hidden
    lib = ExpertLibrary(E, dh, Fh, dh)
    lib.init_weights(out_std=math.sqrt(2 / E) * math.sqrt(2 / Fh))
    dyn = DynSIHA(mc.d_model, H, E, mc.attn_shared, mc.attn_active)
    dyn.init_weights(0.02)
    dense = DenseAttention(mc.d_model, H)
    dense.init_weights(0.02)
    rope = Rope(dh, max_len=T)
    cos, sin = rope.prefix(T)
    ctx = StepContext(0, cos, sin, AttnMask(True))
    x = torch.randn(B, T, mc.d_model, requires_grad=True)
    h_ND = torch.randn(B * T * H, dh, requires_grad=True)
    w_NCE = F.relu(torch.randn(B * T * H, 3, E)).requires_grad_()
    params = [x, h_ND, w_NCE, lib.w1, lib.w2, *dyn.parameters(), *dense.parameters()]
    cands = {
        "compose": fwd_bwd(lambda: lib.compose(h_ND, w_NCE), *params),
        "compose_experts": fwd_bwd(lambda: lib.compose(h_ND, w_NCE, path="experts"), *params),
        "compose_gemm": fwd_bwd(lambda: lib.compose(h_ND, w_NCE, path="gemm"), *params),
        "loop": fwd_bwd(lambda: loop_compose(lib, h_ND, w_NCE), *params),
        "dynsiha_layer": fwd_bwd(lambda: dyn(x, lib, ctx)[0], *params),
        "dense_layer": fwd_bwd(lambda: dense(x, None, ctx)[0], *params),
    }
    t = rounds(cands, n_rounds)
    rows = B * T * H
    # model FLOPs of the composition: experts (2 GEMMs) + the Q/K/V weighted sums; x3 for forward + backward
    flops_compose = 3 * rows * (2 * 2 * dh * Fh * E + 3 * 2 * E * dh)
    return {"times": t, "flops_compose": flops_compose, "tokens": B * T}


def bench_moe(cfg, tokens: int, n_rounds: int) -> dict:
    torch.manual_seed(1)
    mc = cfg.model
    d, E, Fh = mc.d_model, mc.ffn_experts, mc.ffn_mult * mc.d_model
    lib = ExpertLibrary(E, d, Fh, d)
    lib.init_weights(0.02)
    moe = DynMoE(d, E, mc.ffn_active)
    moe.init_weights()
    x = torch.randn(1, tokens, d, requires_grad=True)
    h = F.rms_norm(x.detach(), (d,))
    with torch.no_grad():  # set the gates so that exactly the target number is active on average here
        r = moe.logits(h.reshape(-1, d)) + moe.gate
        moe.gate.fill_(torch.quantile(r.flatten(), 1 - mc.ffn_active / E).item())
    ctx = StepContext(0, torch.zeros(1), torch.zeros(1), AttnMask(True))
    active = float(moe(h, lib, ctx)[1].active) / tokens
    dense_ffn = DenseFFN(d, round(mc.ffn_active * Fh))
    dense_ffn.init_weights(0.02)

    def all_experts():
        hn = F.rms_norm(x, (d,)).reshape(-1, d)
        w = F.relu(moe.logits(hn))[:, 0]  # (N, E): the router has one channel
        return torch.einsum("ne,end->nd", w, lib.dense(hn))

    params = [x, lib.w1, lib.w2, *moe.parameters(), *dense_ffn.parameters()]
    cands = {
        "moe_sparse": fwd_bwd(lambda: moe(F.rms_norm(x, (d,)), lib, ctx)[0], *params),
        "moe_all_experts": fwd_bwd(all_experts, *params),
        "dense_ffn": fwd_bwd(lambda: dense_ffn(F.rms_norm(x, (d,)), None, ctx)[0], *params),
    }
    return {"times": rounds(cands, n_rounds), "active": active}


def bench_cache(cfg, answer: int, sampled: int | None) -> dict:
    """Cached decoding of ``answer`` tokens vs a full forward per token (optionally timed at ``sampled`` evenly
    spaced lengths and integrated: the cost of a forward is smooth in its length)."""
    import time

    torch.manual_seed(2)
    model = ArcTransformer(cfg.model).eval()
    B, P = 2, 200
    prompt = torch.randint(0, 17, (B, P))
    steps = torch.full((B,), cfg.model.max_steps)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, state = model.prefill(prompt, torch.full((B,), P), answer, steps=steps)
        for _ in range(answer):
            logits = model.decode(logits.argmax(-1), state)
        cached = time.perf_counter() - t0
        seq = torch.randint(0, 17, (B, P + answer))
        lengths = list(range(P, P + answer)) if sampled is None else \
            [P + round(i * (answer - 1) / (sampled - 1)) for i in range(sampled)]
        per = []
        for n in lengths:
            t0 = time.perf_counter()
            model(seq[:, :n], halt=True, steps=steps)
            per.append(time.perf_counter() - t0)
    if sampled is None:
        recompute = sum(per)
    else:  # trapezoid over the sampled lengths, one forward per generated token
        recompute = sum((per[i] + per[i + 1]) / 2 * (lengths[i + 1] - lengths[i]) for i in range(len(per) - 1)) \
            + per[-1]
    return {"cached_s": cached, "recompute_s": recompute, "answer": answer, "batch": B, "prompt": P,
            "sampled": sampled}


def exits(N: int) -> list[int]:
    """The early-exit step counts timed against N: 1, N/4 and N/2, each once and at least 1 (N = 2: just 1)."""
    return sorted({max(1, n) for n in (1, N // 4, N // 2) if n < N})


def bench_early_exit(cfg, tokens: int, n_rounds: int) -> dict:
    torch.manual_seed(3)
    model = ArcTransformer(cfg.model).eval()
    N = cfg.model.max_steps
    B, T = max(tokens // 512, 1), 512
    x = torch.randint(0, 17, (B, T))
    cands = {}
    for n in (*exits(N), N):
        s = torch.full((B,), n)
        cands[f"n={n}"] = lambda s=s: model(x, halt=True, steps=s)
    with torch.no_grad():
        t = rounds(cands, n_rounds)
    return {"times": t, "N": N}


def step_trainer(cfg, tokens_per_batch: int, variant: str | None = None, overrides: tuple[str, ...] = ()):
    """A Trainer of ``cfg`` (optionally as another variant) on ARC-AGI-1 tasks of grids <= 10x10, and the largest
    of its first epoch's batches (the same batch for every variant: the data do not depend on the model)."""
    from dyntrm.config import apply_overrides
    from dyntrm.runtime import Runtime
    from dyntrm.train import Trainer

    cfg = apply_overrides(copy.deepcopy(cfg), [f"model.variant={variant}"] if variant else [])
    cfg = apply_overrides(cfg, ["data.max_side=10", "data.max_len=1024", f"data.tokens_per_batch={tokens_per_batch}",
                                *overrides])
    tr = Trainer(cfg, Runtime(torch.device("cpu")))
    plan = tr.data.epoch(0)
    return tr, max((plan.batch(i, tr.data.items) for i in range(len(plan))), key=lambda b: b.n_tokens)


@torch.no_grad()
def routers_at_target(tr, batch) -> float:
    """Set DynMoE's gates so that the nominal number of experts (``model.ffn_active``) is active per real token on
    ``batch`` on average over the recursion steps: where the sparsity controller holds training (within a few
    hundred steps), and above where the recipe's fixed L1 penalty lets it settle (0.4-0.9 on the ladder), so an
    upper bound of the FFN's cost. At initialisation the gates open about twice the target. Returns the mean active
    experts per token before the change (the initial state's)."""
    moe, cfg = tr.model.block.ffn, tr.cfg.model
    seen = []
    hook = moe.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        tr.model(batch.tokens, batch.attention_mask)
    finally:
        hook.remove()
    valid = batch.attention_mask.bool().reshape(-1)
    r = torch.cat([moe.logits(h.reshape(-1, h.shape[-1]))[valid, 0] + moe.gate for h in seen])  # (rows, E)
    before = float((r - moe.gate > 0).sum(1).float().mean())
    moe.gate.fill_(torch.quantile(r.flatten(), 1 - cfg.ffn_active / cfg.ffn_experts).item())
    return before


AT_INIT = "at initialisation (FFN gates not yet at the target)"
# the default step with one switch changed, timed beside it (the breakdown of dyn_vs_dense_train_step)
STEP_ABLATIONS = {"without SARS (shaping.kind=none)": ("shaping.kind=none",),
                  "DynTRM with both libraries (model.variant=dyn)": ("model.variant=dyn",),
                  "DynTRM without SARS": ("model.variant=dyn", "shaping.kind=none"),
                  "DynTRM, sparse attention composition (model.attn_active=4)": ("model.variant=dyn",
                                                                                "model.attn_active=4")}


def bench_train_step(cfg, n_rounds: int, tokens_per_batch: int) -> dict:
    """The preset's training step (its shaper, SARS by default) and the dense variant's on the same batch."""
    dyn, batch = step_trainer(cfg, tokens_per_batch)
    dense, dense_batch = step_trainer(cfg, tokens_per_batch, "dense")
    assert torch.equal(batch.tokens, dense_batch.tokens)
    runs = {"dyn": lambda: dyn.step([batch]), "dense": lambda: dense.step([batch])}
    init_dyn, _ = step_trainer(cfg, tokens_per_batch)  # as initialised: DynMoE's gates open twice the target
    runs[AT_INIT] = lambda: init_dyn.step([batch])
    active_init = routers_at_target(dyn, batch)
    for name, overrides in STEP_ABLATIONS.items():  # where DynTRM's step time goes: one switch at a time
        tr, _ = step_trainer(cfg, tokens_per_batch, overrides=overrides)
        routers_at_target(tr, batch)
        runs[name] = lambda tr=tr: tr.step([batch])
    t = rounds(runs, n_rounds)
    real = batch.n_tokens
    ctx = float(batch.attention_mask.sum(1).float().mean())
    m = dyn.cfg.model
    flops = 3 * m.max_steps * real * model_info(m, int(ctx))["flops_per_token_step"]
    return {"seconds": t["dyn"], "dense_seconds": t["dense"], "tokens": real, "flops": flops,
            "shape": list(batch.tokens.shape), "active_init": active_init,
            "ablations": {k: t[k] for k in (AT_INIT, *STEP_ABLATIONS)}}


def _peak_rss(cfg, tokens_per_batch: int, overrides: tuple[str, ...], queue) -> None:
    torch.set_num_threads(1)
    tr, batch = step_trainer(cfg, tokens_per_batch, overrides=overrides)
    for _ in range(2):
        tr.step([batch])
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux -> MiB


def peak_rss_mib(cfg, tokens_per_batch: int, overrides: tuple[str, ...] = ()) -> float:
    """Peak RSS of a fresh process that builds the trainer and runs two training steps (a process's peak only
    grows, so each setting gets its own; the parent's RSS at the start is a floor of the figure)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss, args=(cfg, tokens_per_batch, overrides, queue))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def main() -> None:
    ap = arguments(__doc__, quick="small sizes, few rounds: under a minute")
    args = ap.parse_args()
    q = args.quick
    # First, while this process is small: a child started by fork + exec reports at least the RSS its parent
    # had when it forked (Linux carries the peak across exec)
    step_tokens = 4096 if q else 8192
    rss = {k: peak_rss_mib(preset("tiny"), step_tokens, over)
           for k, over in (("plain", ()), ("checkpointed", ("train.checkpoint_steps=true",)))}
    torch.manual_seed(0)
    cfg = preset("tiny")
    rate = matmul_rate(2048, 5 if q else 9)
    att = bench_attention(cfg, 1024 if q else 4096, 3 if q else 9)
    moe = bench_moe(cfg, 2048 if q else 4096, 3 if q else 9)
    cache = bench_cache(cfg, 300, 6 if q else None)
    ee = bench_early_exit(cfg, 512 if q else 2048, 3 if q else 7)
    step = bench_train_step(preset("tiny"), 2 if q else 5, step_tokens)

    ta, tm, te = att["times"], moe["times"], ee["times"]
    N = ee["N"]
    fig = {
        "matmul_gflops": rate / 1e9,
        "compose_gflops": att["flops_compose"] / ta["compose"] / 1e9,
        "compose_frac_of_matmul": att["flops_compose"] / ta["compose"] / rate,
        "compose_experts_frac_of_matmul": att["flops_compose"] / ta["compose_experts"] / rate,
        "compose_gemm_frac_of_matmul": att["flops_compose"] / ta["compose_gemm"] / rate,
        "compose_speedup_vs_loop": ta["loop"] / ta["compose"],
        "dynsiha_vs_dense_attention": ta["dynsiha_layer"] / ta["dense_layer"],
        "moe_speedup_vs_all_experts": tm["moe_all_experts"] / tm["moe_sparse"],
        "moe_slowdown_vs_dense_ffn": tm["moe_sparse"] / tm["dense_ffn"],
        "moe_active_experts": moe["active"],
        "kv_cache_speedup": cache["recompute_s"] / cache["cached_s"],
        "train_step_tokens_per_s": step["tokens"] / step["seconds"],
        "train_step_frac_of_matmul": step["flops"] / step["seconds"] / rate,
        "dyn_vs_dense_train_step": step["seconds"] / step["dense_seconds"],
        **{f"dyn_vs_dense_train_step [{k}]": v / step["dense_seconds"] for k, v in step["ablations"].items()},
        "train_step_peak_rss_mib": rss["plain"],
        "train_step_checkpointed_peak_rss_mib": rss["checkpointed"],
        "quick": q,
    }
    for n in exits(N):
        fig[f"early_exit_{n}_of_{N}_time_frac"] = te[f"n={n}"] / te[f"n={N}"]
    rows = [
        ["fp32 matmul rate (reference)", f"{rate / 1e9:.0f} GFLOP/s", "", ""],
        ["DynSIHA+ composition fwd+bwd (default path)", f"{ta['compose'] * 1e3:.1f} ms",
         f"{fig['compose_frac_of_matmul']:.0%} of matmul rate", "goal >= 40%"],
        ["  experts path (the same GEMMs, autograd's backward)", f"{ta['compose_experts'] * 1e3:.1f} ms",
         f"{fig['compose_experts_frac_of_matmul']:.0%} of matmul rate",
         f"default {ta['compose_experts'] / ta['compose']:.2f}x faster"],
        ["  gemm path (one GEMM over experts x hidden)", f"{ta['compose_gemm'] * 1e3:.1f} ms",
         f"{fig['compose_gemm_frac_of_matmul']:.0%} of matmul rate", ""],
        ["  vs per-expert loop", f"{ta['loop'] * 1e3:.1f} ms", f"{fig['compose_speedup_vs_loop']:.2f}x faster", ""],
        ["DynSIHA+ layer vs dense MHA layer", f"{ta['dynsiha_layer'] * 1e3:.1f} / {ta['dense_layer'] * 1e3:.1f} ms",
         f"{fig['dynsiha_vs_dense_attention']:.1f}x the time", "price of dense composition"],
        [f"DynMoE ({moe['active']:.2f} of {cfg.model.ffn_experts} active) vs all {cfg.model.ffn_experts}",
         f"{tm['moe_sparse'] * 1e3:.1f} / {tm['moe_all_experts'] * 1e3:.1f} ms",
         f"{fig['moe_speedup_vs_all_experts']:.1f}x faster", "goal >= 3x"],
        ["DynMoE vs dense FFN of the same active width", f"{tm['dense_ffn'] * 1e3:.1f} ms dense",
         f"{fig['moe_slowdown_vs_dense_ffn']:.2f}x the time", "goal <= 1.5x"],
        [f"KV-cached {cache['answer']}-token answer vs recompute", f"{cache['cached_s']:.2f} / "
         f"{cache['recompute_s']:.1f} s", f"{fig['kv_cache_speedup']:.0f}x faster", "goal >= 10x"
         + (f" (recompute integrated from {cache['sampled']} lengths)" if cache["sampled"] else "")],
    ]
    for n in exits(N):
        frac = fig[f"early_exit_{n}_of_{N}_time_frac"]
        rows.append([f"early exit after {n} of {N} steps", f"{te[f'n={n}'] * 1e3:.0f} / {te[f'n={N}'] * 1e3:.0f} ms",
                     f"{frac:.3f} of full (n/N = {n / N:.3f})", f"goal <= {1.1 * n / N:.3f}"])
    sh = cfg.shaping
    rows += [[f"tiny training step {step['shape']} (shaping {sh.kind}"
              + (f" at token_rate {sh.token_rate}" if sh.kind == "sars" else "")
              + f"; {cfg.model.ffn_active:g} FFN experts active, {step['active_init']:.2f} at init)",
              f"{step['seconds']:.2f} s",
              f"{fig['train_step_tokens_per_s']:.0f} tok/s, {fig['train_step_frac_of_matmul']:.0%} of matmul rate",
              "goal >= 30%"],
             ["  vs the dense variant, same batch", f"{step['dense_seconds']:.2f} s dense",
              f"{fig['dyn_vs_dense_train_step']:.2f}x the time", "goal <= 1.5x"],
             *[[f"  {name}", f"{sec:.2f} s", f"{sec / step['dense_seconds']:.2f}x the dense step", ""]
               for name, sec in step["ablations"].items()],
             ["  peak RSS of a process running it, plain / train.checkpoint_steps",
              f"{rss['plain']:.0f} / {rss['checkpointed']:.0f} MiB", "", ""]]
    text = table(["measurement", "time", "figure", "note"], rows)
    finish("layers", text, fig, write=not args.no_write, note="(quick mode: small sizes, few rounds)" if q else "")


if __name__ == "__main__":
    main()
