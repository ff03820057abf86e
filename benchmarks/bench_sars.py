"""The price of routing shaping: a `tiny` training step with SARS or FARS vs shaping=none, same batch, same run.

    python benchmarks/bench_sars.py [--quick]

SARS adds, per routed module and recursion step, the chain-rule learning cost on a random subset of tokens
(``shaping.token_rate``) and a small meta backward. Goal: a SARS step <= 1.3x a plain step. Prints a table,
writes it to BENCHMARKS.md (section "sars"), ends with one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, finish, rounds, table  # noqa: E402

from dyntrm.config import apply_overrides, preset  # noqa: E402
from dyntrm.runtime import Runtime  # noqa: E402
from dyntrm.train import Trainer  # noqa: E402


def trainer(kind: str, rate: float, tokens: int) -> Trainer:
    cfg = apply_overrides(preset("tiny"), [f"shaping.kind={kind}", f"shaping.token_rate={rate}",
                                           "data.max_side=10", "data.max_len=1024",
                                           f"data.tokens_per_batch={tokens}"])
    return Trainer(cfg, Runtime(torch.device("cpu")))


def main() -> None:
    ap = arguments(__doc__, quick="a smaller batch and fewer rounds: under a minute")
    args = ap.parse_args()
    tokens = 2048 if args.quick else 8192
    variants = {"none": ("none", 1.0), "sars@0.25": ("sars", 0.25), "sars@1.0": ("sars", 1.0),
                "fars": ("fars", 1.0)}
    trainers = {k: trainer(kind, rate, tokens) for k, (kind, rate) in variants.items()}
    ref = trainers["none"]
    plan = ref.data.epoch(0)
    batch = max((plan.batch(i, ref.data.items) for i in range(len(plan))), key=lambda b: b.n_tokens)
    t = rounds({k: (lambda tr=tr: tr.step([batch])) for k, tr in trainers.items()}, 2 if args.quick else 5)
    base = t["none"]
    fig = {f"{k}_vs_none": v / base for k, v in t.items() if k != "none"}
    fig.update(none_seconds=base, batch_tokens=batch.n_tokens, quick=args.quick)
    rows = [["shaping=none (reference)", f"{base:.2f} s", "1.00x", ""]]
    for k in ("sars@0.25", "sars@1.0", "fars"):
        note = "goal <= 1.3x (default token_rate 0.25)" if k == "sars@0.25" else ""
        rows.append([k.replace("@", ", token_rate="), f"{t[k]:.2f} s", f"{t[k] / base:.2f}x", note])
    text = table(["tiny training step, batch " + f"{list(batch.tokens.shape)}", "time", "vs none", "note"], rows)
    finish("sars", text, fig, write=not args.no_write, note="(quick mode: small batch, few rounds)" if args.quick else "")


if __name__ == "__main__":
    main()
