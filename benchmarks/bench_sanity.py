"""The sanity ladder: can the default recipe learn rules that a child infers from three examples?

    python benchmarks/bench_sanity.py --budget-minutes M [--quick] [--variant NAME=KEY=V,KEY=V ...]

Writes the ladder (``dyntrm data synth``: ten procedural families, ``--tasks`` training and ``--eval-tasks``
held-out tasks per family, grid sides ``--sides``), then trains each variant for the same wall-clock budget on the
training tasks (whole tasks, augmented) and scores the held-out tasks' test inputs: pass@1 per family (greedy,
one view), answers of the right shape, cells right, mean halting step (all answers, and solved ones), beside the
copy-the-input reference. Variants:

- ``default``: the `tiny` preset exactly as a user gets it;
- ``dense``: its dense variant (ordinary attention and FFN, same recursion and ACT), same time;
- ``dense=tokens``: the dense variant for as many optimizer steps (hence tokens) as ``default`` ran;
- any ``NAME=KEY=VALUE,KEY=VALUE``: the default with those overrides (an ablation).

``--diagnose-every K`` also records, every K steps, teacher-forced accuracy of the held-out answers per token
class (size header, row separators, END, copied cells, changed cells: ``dyntrm.diagnose``). Results go to
BENCHMARKS.md (section "sanity", or ``--section``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, final_json, table, write_section  # noqa: E402

from dyntrm.config import apply_overrides, preset  # noqa: E402
from dyntrm.data.arc import load_source  # noqa: E402
from dyntrm.data.dataset import eval_items  # noqa: E402
from dyntrm.data.synth import FAMILIES, family_of, parse_sides, write_ladder  # noqa: E402
from dyntrm.diagnose import answer_accuracy  # noqa: E402
from dyntrm.evaluate import evaluate_items, metrics_of  # noqa: E402
from dyntrm.scoring import copy_input_reference  # noqa: E402
from dyntrm.train import train  # noqa: E402

CORE = ("identity", "mirror", "recolour", "transpose")
DENSE = ["model.variant=dense", "shaping.kind=none"]  # the goal: mean pass@1 >= 0.6 over these


def ladder_dir(args) -> Path:
    d = Path(args.out) / f"ladder-{'_'.join(args.families)}-{args.tasks}-{args.eval_tasks}-{args.sides}-{args.seed}"
    if not (d / "evaluation").exists():
        write_ladder(d, args.families, args.tasks, args.eval_tasks, parse_sides(args.sides), args.seed)
    return d


def config(args, source: Path, overrides: list[str], *, minutes: float | None, steps: int | None):
    return apply_overrides(preset("tiny"), [
        f"data.source={source}", "data.train_splits=train", "data.demo_splits=", "data.eval_split=eval",
        f"data.max_len={args.max_len}", f"train.seed={args.seed}", "train.save_every=0", "train.log_every=10",
        f"train.time_budget_s={minutes * 60:g}" if minutes else "train.time_budget_s=0",
        f"train.steps={steps}" if steps else "train.steps=1000000",
        *args.set, *overrides,
    ])


def per_family(metrics: dict) -> dict[str, dict[str, float]]:
    fams: dict[str, list[dict]] = {}
    for tid, t in metrics["tasks"].items():
        fams.setdefault(family_of(tid), []).append(t)
    return {f: {k: float(np.mean([t[k] for t in ts])) for k in ("pass@1", "shape@1", "cells@1")}
            for f, ts in fams.items()}


def run_variant(name: str, overrides: list[str], *, args, source: Path, items, minutes, steps, diag_items):
    cfg = config(args, source, overrides, minutes=minutes, steps=steps)
    if args.diagnose_every:
        cfg.train.eval_every = args.diagnose_every
    curve = []

    def diagnose(tr, metrics_path):
        acc = answer_accuracy(tr.ema_model(), diag_items)
        curve.append({"step": tr.state.step, **acc})
        print(f"  [{name}] step {tr.state.step}: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)

    run_dir = Path(args.out) / "runs" / name.replace("=", "_").replace(" ", "_")
    t0 = time.perf_counter()
    tr, last = train(cfg, run_dir, live=False, on_eval=diagnose)
    train_s = time.perf_counter() - t0
    model = tr.ema_model()
    if args.diagnose_every and (not curve or curve[-1]["step"] != tr.state.step):  # the last step, once
        diagnose(tr, None)
    results, stats = evaluate_items(model, items, n_views=1, max_len=cfg.data.max_len,
                                    cap_to_prompt=not cfg.model.size_header)
    m = metrics_of(results, stats)
    fam = per_family(m)
    solved_steps = [t["mean_steps"] for task in m["tasks"].values() for t in task["tests"] if t["solved@1"]]
    row = {"variant": name, "overrides": overrides, "steps": last["step"], "tokens": last["tokens_seen"],
           "tok_per_s": last["tok_per_s"], "train_minutes": train_s / 60, "final_lm": last.get("lm_last"),
           "pass@1": m["pass@1"], "shape@1": m["shape@1"], "cells@1": m["cells@1"],
           "core_pass@1": float(np.mean([fam[f]["pass@1"] for f in CORE if f in fam])) if any(
               f in fam for f in CORE) else float("nan"),
           "halt_all": m["mean_steps"], "halt_solved": float(np.mean(solved_steps)) if solved_steps else float("nan"),
           "max_steps": cfg.model.max_steps, "families": fam, "curve": curve}
    print(f"[{name}] {row['steps']} steps, {row['tokens'] / 1e6:.2f}M tokens, pass@1 {row['pass@1']:.3f} "
          f"(core {row['core_pass@1']:.3f}), shape {row['shape@1']:.3f}, cells {row['cells@1']:.3f}, "
          f"halting {row['halt_all']:.2f} (solved {row['halt_solved']:.2f}) of {row['max_steps']}", flush=True)
    print("   " + " ".join(f"{f} {v['pass@1']:.2f}" for f, v in fam.items()), flush=True)
    return row


def render(rows: list[dict], ref: dict, families: list[str], args) -> str:
    head = ["variant", "steps", "tokens", "tok/s"] + list(families) + ["core 4", "all", "right shape", "cells right",
                                                                      "halting step (all / solved) of N"]
    body = []
    for r in rows:
        body.append([r["variant"], r["steps"], f"{r['tokens'] / 1e6:.2f}M", f"{r['tok_per_s']:.0f}"]
                    + [f"{r['families'].get(f, {}).get('pass@1', float('nan')):.2f}" for f in families]
                    + [f"{r['core_pass@1']:.3f}", f"{r['pass@1']:.3f}", f"{r['shape@1']:.3f}", f"{r['cells@1']:.3f}",
                       f"{r['halt_all']:.2f} / {r['halt_solved']:.2f} of {r['max_steps']}"])
    body.append(["copy the test input (reference)", "-", "-", "-"] + ["-"] * len(families)
                + ["-", f"{ref['pass@1']:.3f}", f"{ref['shape@1']:.3f}", f"{ref['cells@1']:.3f}", "-"])
    shared = (f", {args.jobs} variants at a time ({max(1, (os.cpu_count() or 1) // args.jobs)} thread(s) each)"
              if args.jobs > 1 else "")
    budget = (f"Budget {args.budget_minutes:g} min of training per variant" if args.budget_minutes
              else "Equal optimizer steps (no time budget)")
    text = (f"{budget} on {os.cpu_count()} CPU cores{shared}; "
            f"ladder: {len(families)} "
            f"families x {args.tasks} training tasks, {args.eval_tasks} held-out tasks per family, sides "
            f"{args.sides}, seed {args.seed}. pass@1 per family on the held-out test inputs (greedy, 1 view).\n\n"
            + table(head, body))
    curves = [r for r in rows if r["curve"]]
    if curves:
        text += ("\n\nTeacher-forced accuracy of the held-out answers per token class during training "
                 "(`dyntrm.diagnose`; cells at the last recursion step, @1 at the first):\n\n")
        keys = [k for k in curves[0]["curve"][0] if k != "step"]
        text += table(["variant", "step"] + keys,
                      [[r["variant"], c["step"]] + [f"{c[k]:.2f}" for k in keys] for r in curves for c in r["curve"]])
    overrides = [f"`{r['variant']}`: {' '.join(r['overrides']) or '(the tiny preset)'}" for r in rows]
    return text + "\n\nVariants: " + "; ".join(overrides) + "."


def die_with_parent() -> None:
    """A worker's initializer: on Linux the kernel sends it SIGTERM when this benchmark dies (killed or
    interrupted), so that no orphaned training run goes on holding a core."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=15.0)
    p.add_argument("--quick", action="store_true", help="2 minutes, 4 families, 40 + 5 tasks each (smoke run)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--tasks", type=int, default=100, help="training tasks per family")
    p.add_argument("--eval-tasks", type=int, default=20, help="held-out tasks per family")
    p.add_argument("--sides", default="3-6")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--variant", nargs="+", default=["default", "dense", "dense=tokens"],
                   help="default, dense, dense=tokens, or NAME=KEY=V,KEY=V")
    p.add_argument("--set", action="append", default=[], help="override applied to every variant")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the time-budgeted variants this many at a time, the cores shared equally (--jobs 2 on "
                        "2 cores: one thread each)")
    p.add_argument("--diagnose-every", type=int, default=0)
    p.add_argument("--diagnose-items", type=int, default=60)
    p.add_argument("--out", default="runs/sanity")
    p.add_argument("--section", default="sanity")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.budget_minutes, args.families, args.tasks, args.eval_tasks = 2.0, list(CORE), 40, 5
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source = ladder_dir(args)
    items = eval_items(load_source(source).split("eval"))
    rng = np.random.default_rng(0)
    diag_items = [items[i] for i in sorted(rng.choice(len(items), min(args.diagnose_items, len(items)),
                                                      replace=False))]
    timed = []
    for spec in args.variant:  # every variant under the time budget first; dense=tokens needs default's steps
        name, _, rest = spec.partition("=")
        if spec == "default":
            timed.append((spec, "default", []))
        elif spec == "dense":
            timed.append((spec, "dense", DENSE))
        elif spec != "dense=tokens":
            timed.append((spec, name, [kv for kv in rest.split(",") if kv]))
    if "dense=tokens" in args.variant and "default" not in args.variant:
        raise SystemExit("dense=tokens needs the default variant")
    kw = dict(args=args, source=source, items=items, minutes=args.budget_minutes, steps=None, diag_items=diag_items)
    if args.jobs > 1:  # equal time on equal cores: each variant its share of the cores, all at once
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=die_with_parent) as pool:
            futures = {spec: pool.submit(run_variant, name, [*ov, f"train.threads={threads}"], **kw)
                       for spec, name, ov in timed}
            by_spec = {spec: f.result() for spec, f in futures.items()}
    else:
        by_spec = {spec: run_variant(name, ov, **kw) for spec, name, ov in timed}
    if "dense=tokens" in args.variant:
        by_spec["dense=tokens"] = run_variant("dense, equal tokens", DENSE,
                                              **dict(kw, minutes=None, steps=by_spec["default"]["steps"]))
    rows = [by_spec[spec] for spec in args.variant]
    ref = copy_input_reference(items)
    text = render(rows, ref, args.families, args)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.section}.json").write_text(json.dumps(rows, indent=1, default=str))
    if not args.no_write:
        write_section(args.section, command_line(), text)
    final_json({r["variant"]: {"pass@1": r["pass@1"], "core_pass@1": r["core_pass@1"], "shape@1": r["shape@1"],
                               "halt_solved": r["halt_solved"]} for r in rows})


if __name__ == "__main__":
    main()
