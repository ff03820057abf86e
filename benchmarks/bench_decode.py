"""Decoding speed of the `tiny` model: batched KV-cached decoding vs recomputing the whole sequence for every
token, ACT early exit (every sample halting after n steps) vs always N steps, and the cost of the symmetry features
(the same model without ``model.dihedral_cells``).

    python benchmarks/bench_decode.py [--quick]

Every configuration decodes the same prompts for the same number of tokens (greedy, no early END), so tokens/s
compare like with like. Prints a table, writes it to BENCHMARKS.md (section "decode"), ends with one JSON line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, finish, table  # noqa: E402

from dyntrm.config import preset  # noqa: E402
from dyntrm.model import ArcTransformer  # noqa: E402


@torch.no_grad()
def cached(model, prompts, n_new, steps):
    B, P = prompts.shape
    t0 = time.perf_counter()
    logits, state = model.prefill(prompts, torch.full((B,), P), n_new, steps=steps)
    for _ in range(n_new - 1):
        logits = model.decode(logits.argmax(-1), state)
    return time.perf_counter() - t0


@torch.no_grad()
def uncached(model, prompts, n_new, steps, sampled=None):
    """One full forward per generated token; with ``sampled``, timed at that many evenly spaced lengths and
    integrated (a forward's cost is smooth in its length)."""
    B, P = prompts.shape
    seq = torch.cat([prompts, torch.randint(0, 10, (B, n_new))], 1)
    lengths = list(range(P, P + n_new)) if sampled is None else \
        [P + round(i * (n_new - 1) / (sampled - 1)) for i in range(sampled)]
    per = []
    for n in lengths:
        t0 = time.perf_counter()
        model(seq[:, :n], halt=True, steps=steps).final_logits[:, -1].argmax(-1)
        per.append(time.perf_counter() - t0)
    if sampled is None:
        return sum(per)
    return sum((per[i] + per[i + 1]) / 2 * (lengths[i + 1] - lengths[i]) for i in range(len(per) - 1)) + per[-1]


def main() -> None:
    ap = arguments(__doc__, quick="fewer tokens: under a minute")
    args = ap.parse_args()
    q = args.quick
    torch.manual_seed(0)
    cfg = preset("tiny").model
    model = ArcTransformer(cfg).eval()
    B, P, L = (16, 200, 64) if q else (32, 300, 200)
    prompts = torch.randint(0, 17, (B, P))
    N = cfg.max_steps
    full = torch.full((B,), N)
    reps = 1 if q else 3
    t_cached = sorted(cached(model, prompts, L, full) for _ in range(reps))[reps // 2]
    sampled = 5 if q else 9  # a full forward's cost is smooth in the length: integrate from sampled lengths
    t_uncached = uncached(model, prompts, L, full, sampled=sampled)
    plain = ArcTransformer(replace(cfg, dihedral_cells=False)).eval()
    t_plain = sorted(cached(plain, prompts, L, full) for _ in range(reps))[reps // 2]
    exits = {}
    for n in sorted({1, max(1, N // 4), max(1, N // 2)}):  # tiny has N = 2: only 1 of 2
        exits[n] = sorted(cached(model, prompts, L, torch.full((B,), n)) for _ in range(reps))[reps // 2]
    tok = B * L
    fig = {"cached_tok_per_s": tok / t_cached, "uncached_tok_per_s": tok / t_uncached,
           "cached_speedup": t_uncached / t_cached, "dihedral_cells_cost": t_cached / t_plain, "batch": B,
           "prompt": P, "new_tokens": L, "quick": q}
    rows = [[f"cached, batch {B}, prompt {P}, {L} new tokens, N = {N}", f"{t_cached:.2f} s", f"{tok / t_cached:.0f}",
             "1.00"],
            [f"uncached (full recompute per token) [integrated from {sampled} lengths]",
             f"{t_uncached:.1f} s", f"{tok / t_uncached:.0f}", f"{t_cached / t_uncached:.3f}"],
            ["cached, without the symmetry features (model.dihedral_cells=false)", f"{t_plain:.2f} s",
             f"{tok / t_plain:.0f}", f"{t_cached / t_plain:.2f}"]]
    for n, t in exits.items():
        fig[f"early_exit_{n}_of_{N}_speedup"] = t_cached / t
        rows.append([f"cached, every sample halting after {n} of {N} steps", f"{t:.2f} s", f"{tok / t:.0f}",
                     f"{t_cached / t:.2f} (ideal {N / n:.1f})"])
    text = table(["decoding (tokens/s include the prefill)", "time", "tokens/s", "speed vs cached, N steps"], rows)
    finish("decode", text, fig, write=not args.no_write, note="(quick mode)" if q else "")


if __name__ == "__main__":
    main()
