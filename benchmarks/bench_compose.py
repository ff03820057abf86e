"""DynSIHA+ composition paths by row chunk and thread count: the measurement behind the CPU default path and chunk.

    python benchmarks/bench_compose.py [--quick]

Forward + backward of ``ExpertLibrary.compose`` at tiny's attention-library shapes (E = 16 experts, d_head = hidden
= 32, C = 3 channels), the ``experts`` path (autograd's backward) and the ``manual`` path (expert-major activations,
backward written out), each at several row chunks, on 1 and 2 threads. Reports the median time, the share of the
fp32 matmul rate (measured in the same run, same threads) and each candidate's speed against the previous default,
``experts`` with 256-row chunks.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, finish, matmul_rate, rounds, table  # noqa: E402

from dyntrm.model.experts import ExpertLibrary  # noqa: E402

CHUNKS = (128, 256, 512, 1024)
REFERENCE = ("experts", 256)  # the CPU default before the manual path


def main() -> None:
    args = arguments(__doc__, quick="8k rows, 3 rounds").parse_args()
    rows, n_rounds = (8192, 3) if args.quick else (32768, 5)
    E, d, C = 16, 32, 3
    torch.manual_seed(0)
    lib = ExpertLibrary(E, d, d, d)
    lib.init_weights(out_std=math.sqrt(2 / E) * math.sqrt(2 / d))
    h = torch.randn(rows, d, requires_grad=True)
    w = F.relu(torch.randn(rows, C, E)).requires_grad_()
    g = torch.randn(rows, C, d)
    flops = 3 * rows * (2 * 2 * d * d * E + C * 2 * E * d)  # the model's FLOPs, x3 for forward + backward

    def run(path: str, chunk: int):
        def fn():
            torch.autograd.grad(lib.compose(h, w, chunk=chunk, path=path), [h, w, lib.w1, lib.w2], g)
        return fn

    out_rows, figures = [], {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rate = matmul_rate()
        cands = {(p, c): run(p, c) for p in ("experts", "manual") for c in CHUNKS}
        t = rounds({f"{p}@{c}": fn for (p, c), fn in cands.items()}, n_rounds)
        ref = t[f"{REFERENCE[0]}@{REFERENCE[1]}"]
        for (p, c) in cands:
            s = t[f"{p}@{c}"]
            out_rows.append([threads, p, c, f"{s * 1e3:.1f} ms", f"{flops / s / rate:.0%}", f"{ref / s:.2f}x"])
            figures[f"{p}@{c} threads={threads} speedup"] = ref / s
    text = table(["threads", "path", "chunk (rows)", "fwd+bwd", "of matmul rate", "vs experts@256"], out_rows)
    text = f"{rows} rows (token x head), E = {E}, d_head = hidden = {d}, C = {C}; median of {n_rounds} rounds.\n\n" + text
    finish("compose paths", text, figures, write=not args.no_write)


if __name__ == "__main__":
    main()
