"""Does each idea pay for itself? Variants trained under the same wall-clock budget on the same data.

    python benchmarks/bench_learning.py --budget-minutes M [--seeds 0 1] [--quick]

Data: the ARC-AGI-1 tasks (training and evaluation splits) whose grids are all <= 10 x 10; every variant trains on
all their demonstration pairs with augmentation and is scored by pass@2 with 8 views on their held-out test
inputs (a fixed random subset of ``--eval-limit`` of them, the same for every variant; answers limited to the
largest grid side of their prompt to bound decoding cost on a CPU). Variants (all the `tiny` preset):

- ``sars``  DynTRM with SARS (the default)        - ``fars``  DynTRM with FARS
- ``none``  DynTRM without routing shaping        - ``dense`` the dense variant (same recursion and ACT)
- ``N=1``   DynTRM with SARS and no recursion

The table gives parameters (total / active per token), tokens seen, the final training loss, pass@2 and the mean
halting step; a second table measures expert self-organisation (routing entropy, experts in use, mutual
information between expert choice and task / colour / position) after training against the same model at
initialisation, on the same fixed training sequences. Results go to BENCHMARKS.md (section "learning").
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, command_line, final_json, table, write_section  # noqa: E402

from dyntrm.analysis import routing_profile  # noqa: E402
from dyntrm.config import apply_overrides, preset  # noqa: E402
from dyntrm.data.arc import filter_max_side, load_source  # noqa: E402
from dyntrm.data.batching import collate  # noqa: E402
from dyntrm.data.dataset import eval_items  # noqa: E402
from dyntrm.data.tokens import encode  # noqa: E402
from dyntrm.evaluate import evaluate_items, metrics_of  # noqa: E402
from dyntrm.model import ArcTransformer  # noqa: E402
from dyntrm.model.info import model_info  # noqa: E402
from dyntrm.runtime import Runtime  # noqa: E402
from dyntrm.scoring import copy_input_reference  # noqa: E402
from dyntrm.train import train  # noqa: E402

VARIANTS = {
    "sars": [],
    "fars": ["shaping.kind=fars"],
    "none": ["shaping.kind=none"],
    "dense": ["model.variant=dense", "shaping.kind=none"],
    "N=1": ["model.max_steps=1"],
}
MAX_SIDE = 10


def config(variant: str, seed: int, minutes: float):
    return apply_overrides(preset("tiny"), [
        "data.source=arc1", "data.train_splits=", "data.demo_splits=train,eval", "data.eval_split=eval",
        f"data.max_side={MAX_SIDE}", "data.max_len=1536", "data.tokens_per_batch=4096",
        f"train.time_budget_s={minutes * 60:g}", "train.steps=1000000", "train.warmup=20", "train.lr=2e-3",
        "train.log_every=10", "train.save_every=0", "train.ema_decay=0.99", f"train.seed={seed}",
        *VARIANTS[variant],
    ])


def scored_items(limit: int | None, seed: int = 1234):
    src = load_source("arc1")
    items = eval_items(filter_max_side(src.split("train"), MAX_SIDE) + filter_max_side(src.split("eval"), MAX_SIDE))
    if limit and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return items


def profile_batches(n: int = 24):
    """Fixed, un-augmented training sequences for the self-organisation measures."""
    src = load_source("arc1")
    tasks = filter_max_side(src.split("train"), MAX_SIDE)[:n]
    return [collate([encode(t.train)], [t.id]) for t in tasks]


def run(variant: str, seed: int, minutes: float, items, views: int, workdir: Path, profile) -> dict:
    cfg = config(variant, seed, minutes)
    out = workdir / f"{variant}-s{seed}"
    t0 = time.perf_counter()
    tr, last = train(cfg, out, rt=Runtime(torch.device("cpu")), live=False)
    train_s = time.perf_counter() - t0
    model = tr.ema_model()
    results, stats = evaluate_items(model, items, n_views=views, seed=seed, cap_to_prompt=True)
    m = metrics_of(results, stats)
    info = model_info(cfg.model)
    row = {"variant": variant, "seed": seed, "params": info["params_total"],
           "active_params": info["params_active_per_token"], "tokens_seen": last["tokens_seen"],
           "steps": last["step"], "final_train_loss": last["lm"], "pass@2": m["pass@2"], "pass@1": m["pass@1"],
           "shape@1": m["shape@1"], "cells@1": m["cells@1"],
           "mean_halting_step": m["mean_steps"], "train_seconds": train_s, "eval_seconds": stats["decode_seconds"]}
    if cfg.model.variant == "dyn":
        torch.manual_seed(seed)
        init = ArcTransformer(cfg.model)  # the same initialisation the run started from
        row["profile_trained"] = routing_profile(model, profile)
        row["profile_init"] = routing_profile(init, profile)
    return row


def main() -> None:
    ap = arguments(__doc__, quick="6 s per run, 1 seed, 8 test inputs, 2 views")
    ap.add_argument("--budget-minutes", type=float, default=4.0, help="training wall-clock budget per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=96, help="scored test inputs (a fixed random subset)")
    ap.add_argument("--keep", default=None, help="keep the run directories here")
    args = ap.parse_args()
    if args.quick:
        args.budget_minutes, args.seeds, args.eval_limit, args.views = 0.1, args.seeds[:1], 8, 2
    items = scored_items(args.eval_limit)
    profile = profile_batches(8 if args.quick else 24)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_learning_"))
    rows = []
    for seed in args.seeds:
        for v in args.variants:
            row = run(v, seed, args.budget_minutes, items, args.views, workdir, profile)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("profile")}), flush=True)
            rows.append(row)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)

    def mean(v, k):
        vals = [r[k] for r in rows if r["variant"] == v]
        return statistics.mean(vals) if vals else float("nan")

    main_rows = []
    for v in args.variants:
        r0 = next(r for r in rows if r["variant"] == v)
        per_seed = ", ".join(f"{r['pass@2']:.3f}" for r in rows if r["variant"] == v)
        main_rows.append([v, f"{r0['params'] / 1e6:.2f}M / {r0['active_params'] / 1e6:.2f}M",
                          f"{mean(v, 'tokens_seen') / 1e3:.0f}k", f"{mean(v, 'steps'):.0f}",
                          f"{mean(v, 'final_train_loss'):.3f}", f"{mean(v, 'pass@2'):.3f} ({per_seed})",
                          f"{mean(v, 'shape@1'):.3f}", f"{mean(v, 'cells@1'):.3f}",
                          f"{mean(v, 'mean_halting_step'):.2f}"])
    ref = copy_input_reference(items)
    main_rows.append(["copy the test input (reference)", "-", "-", "-", "-", f"{ref['pass@2']:.3f}",
                      f"{ref['shape@1']:.3f}", f"{ref['cells@1']:.3f}", "-"])
    text = table(["variant", "params total / active", "tokens seen", "steps", "final train LM loss",
                  "pass@2 (per seed)", "right shape", "cells right", "mean halting step"], main_rows)
    org_rows = []
    for v in args.variants:
        runs = [r for r in rows if r["variant"] == v and "profile_trained" in r]
        if not runs:
            continue
        for kind in ("q", "ffn"):
            def avg(which, key):
                return statistics.mean(r[which][f"{kind}_{key}"] for r in runs)
            org_rows.append([v, kind] + [f"{avg('profile_init', k):.3f} -> {avg('profile_trained', k):.3f}"
                                          for k in ("entropy_nats", "experts_in_use", "mi_task_bits",
                                                    "mi_colour_bits", "mi_position_bits")])
    text2 = table(["variant", "module", "routing entropy (nats)", "experts in use", "MI(choice; task) bits",
                   "MI(choice; colour) bits", "MI(choice; position) bits"], org_rows)
    n_items = len(items)
    header = (f"Budget {args.budget_minutes:g} min of training per run on 2 CPU cores, seeds {args.seeds}; "
              f"pass@2 with {args.views} views on a fixed subset of {n_items} test inputs of the ARC-AGI-1 tasks "
              f"with grids <= 10x10 (answers limited to the largest grid side of their prompt).")
    print(header)
    print(text)
    print(text2)
    if not args.no_write:
        write_section("learning", command_line(), header + "\n\n" + text + "\n\nExpert self-organisation, at "
                      "initialisation -> after training (same fixed 24 training sequences; q stands for the "
                      "attention composition, ffn for DynMoE; all recursion steps pooled):\n\n" + text2
                      + ("\n\n(quick mode: a smoke test, not a measurement)" if args.quick else ""))
    final_json({"rows": [{k: v for k, v in r.items() if not k.startswith("profile")} for r in rows],
                "budget_minutes": args.budget_minutes, "seeds": args.seeds, "views": args.views,
                "eval_items": n_items, "quick": args.quick})


if __name__ == "__main__":
    main()
