"""Training (DESIGN §4): the Trainer (model, DDP wrapper, AdamW groups, EMA, checkpoints, one optimizer step),
``train()``, which claims the run directory (``rundir.py``), and the loop, ``loop()``: {step, log, evaluate every k,
save every k}.

One step: for each micro-batch, forward with the routing shaper's tap, the loss (``loss.py``), backward; then the
shaper adds its gradients (``shaping.kind``: SARS by default, FARS, or none), the logged sums and the finiteness
verdict are all-reduced in one go, the optimizer steps, the EMA follows, and DynMoE's sparsity controller moves the
L1 coefficient (and the attention routers' controller theirs, under ``model.attn_active``). A non-finite step is
skipped; too many in a row stop the run, and no checkpoint is saved while they last, so the newest one is from
before them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import checkpoint, rundir
from .config import Config, ConfigError, to_dict
from .data.arc import load_source
from .data.batching import Batch
from .data.dataset import Epoch, TrainingSet, progress_share, split_items, training_items
from .evaluate import evaluate_items, metrics_of, score_line
from .io import append_jsonl, write_json
from .loss import compute_loss, detach_steps, global_counts
from .model import ArcTransformer
from .model.moe import SparsityController
from .optim import lr_factor, param_groups, run_progress
from .runtime import Runtime, setup
from .shaping import make_shaper


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps); the message names the checkpoint to resume from."""


CONTROLLER_FIELDS = ("l1_init", "l1_factor", "l1_two_sided", "l1_max")  # what an L1 coefficient's meaning depends on


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch of the epoch
    l1_coef: float = 0.0
    attn_l1_coef: float = 0.0  # model.attn_active: the attention routers' L1 coefficient
    bad_in_row: int = 0
    bad_total: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    share: float = 1.0  # data.curriculum: the share of the shortest sequences the current epoch trains on


# ------------------------------------------------------------------------------------------------ pieces

class EMA:
    """fp32 exponential moving average of the weights, with the usual early ramp ``(1 + n) / (10 + n)``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


# ------------------------------------------------------------------------------------------------ the trainer

class Trainer:
    """The raw model (saved, evaluated), its DDP wrapper (trained), the optimizer, the EMA, the data stream, the
    routing shaper, the sparsity controller and the state."""

    def __init__(self, cfg: Config, rt: Runtime, run_dir: str | Path | None = None, *, resume: bool = False,
                 data: TrainingSet | None = None):
        self.cfg, self.rt = cfg, rt
        self.run_dir = Path(run_dir) if run_dir is not None else None
        torch.manual_seed(cfg.train.seed)
        self.model = ArcTransformer(cfg.model).to(rt.device)
        start = self._initial_weights() if cfg.train.init and not resume else None  # before the EMA copies them
        self.net: nn.Module = self.model
        if cfg.train.compile and rt.device.type == "cuda":
            # Compile the block in place: it is re-entered N times with the same shapes, the recursion and the
            # data-dependent expert dispatch stay eager, and state_dict keys keep no "_orig_mod." prefix.
            self.model.block.compile()
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.train.lr,
                                           betas=(cfg.train.beta1, cfg.train.beta2), fused=None)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.state = TrainState(l1_coef=cfg.train.l1_init, attn_l1_coef=cfg.train.l1_init)
        if start is not None:  # the controllers go on from where the checkpoint's left them, if they are the same
            self.state.l1_coef = start.get("l1_coef", self.state.l1_coef)
            self.state.attn_l1_coef = start.get("attn_l1_coef", self.state.attn_l1_coef)
        self.data = data if data is not None else self._training_set()
        self.shaper = make_shaper(cfg, self.model, rt, self.optimizer)  # shaping.kind: sars, fars or none
        self.detach_steps = detach_steps(cfg)  # train.grad_steps: the first steps run without gradient
        self.saved: tuple[int | None, Path | None] = (None, None)  # the step whose state is on disk, and where
        # the L1 controllers of the routers that exist: DynMoE's (variants dyn, dynmoe), the attention routers'
        # under a sparse composition
        self.sparsity = SparsityController.for_config(cfg) if cfg.model.dyn_ffn else None
        self.attn_sparsity = SparsityController.for_config(cfg, "attn") if cfg.model.attn_sparse else None
        if resume:
            self.restore(checkpoint.load(self.run_dir, warn=lambda m: rt.print0(f"warning: {m}", file=sys.stderr)))

    def _initial_weights(self) -> dict[str, Any]:
        """``train.init``: load that checkpoint's weights (its EMA where it has one) into the model; returns its
        training state (the L1 coefficients). The checkpoint's model config must be this run's."""
        ckpt = checkpoint.load(self.cfg.train.init, state=False,
                               warn=lambda m: self.rt.print0(f"warning: {m}", file=sys.stderr))
        changed = self._changed(ckpt["meta"]["config"], ("model",))
        if changed:
            raise ConfigError(f"train.init={self.cfg.train.init}: {ckpt['dir']} is a model of another config "
                              f"({', '.join(changed)} differ); fine-tuning keeps the model's config")
        name = "ema" if ckpt["ema"] is not None else "model"
        checkpoint.check_weights(self.model.state_dict(), ckpt[name], ckpt["dir"] / f"{name}.safetensors")
        self.model.load_state_dict(ckpt[name])
        t, theirs_t = self.cfg.train, ckpt["config"].train
        same_controller = all(getattr(t, k) == getattr(theirs_t, k) for k in CONTROLLER_FIELDS) and (
            self.cfg.shaping.meta_only == ckpt["config"].shaping.meta_only)
        # a coefficient is the state of its controller: under another one (a fixed coefficient, one-sided, another
        # bound) it would mean something else, so the new controller starts afresh from l1_init
        return ckpt["meta"]["train_state"] if same_controller else {}

    def _training_set(self) -> TrainingSet:
        d = self.cfg.data
        src = load_source(d.source)
        items = training_items(src, train_splits=d.train_splits, demo_splits=d.demo_splits, eval_split=d.eval_split,
                               max_side=d.max_side)
        return TrainingSet(items, max_len=d.max_len, tokens_per_batch=d.tokens_per_batch, augment=d.augment,
                           repeats=d.repeats, seed=self.cfg.train.seed, rank=self.rt.rank, world=self.rt.world,
                           header=self.cfg.model.size_header, curriculum_epochs=d.curriculum_epochs)

    # -------------------------------------------------------------------------------------- checkpoints

    def rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if self.rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        return rng

    def save(self) -> Path | None:
        if self.run_dir is None:
            return None
        if self.saved[0] == self.state.step:  # nothing changed since (e.g. stopped right after a periodic save)
            return self.saved[1]
        # every rank's RNG (SARS subsamples tokens per rank), gathered to rank 0
        rngs = [self.rng_state()]
        if self.rt.distributed:
            rngs = [None] * self.rt.world
            torch.distributed.all_gather_object(rngs, {k: v.cpu() for k, v in self.rng_state().items()})
        if self.rt.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "rng": rngs}
            meta = checkpoint.meta_for(self.cfg, train_state=asdict(self.state))
            path = checkpoint.save(self.run_dir, self.state.step, model_state=self.model.state_dict(),
                                   ema_state=self.ema.state_dict() if self.ema else None, state=state, meta=meta,
                                   keep=self.cfg.train.keep)
        else:
            path = None
        self.rt.barrier()
        self.saved = (self.state.step, path)
        return path

    def _changed(self, saved: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
        """The fields of ``sections`` where a checkpoint's saved config differs from this run's, as ``sec.key``
        (compared as JSON: the saved config's tuples came back as lists)."""
        current = json.loads(json.dumps(to_dict(self.cfg)))
        return [f"{sec}.{k}" for sec in sections for k in current[sec] if saved[sec].get(k) != current[sec][k]]

    def restore(self, ckpt: dict[str, Any]) -> None:
        changed = self._changed(ckpt["meta"]["config"], ("model", "data"))
        if changed:  # the data position and the weights only mean something under the same model and data
            raise ConfigError(f"{ckpt['dir']}: cannot resume with changed {', '.join(changed)} "
                              f"(train.* and shaping.* may change on resume)")
        checkpoint.check_weights(self.model.state_dict(), ckpt["model"], ckpt["dir"] / "model.safetensors")
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt["ema"] is not None:
            checkpoint.check_weights(self.ema.state_dict(), ckpt["ema"], ckpt["dir"] / "ema.safetensors")
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["state"]["optimizer"])
        rngs = ckpt["state"]["rng"]
        if len(rngs) != self.rt.world:  # another world size: exactness is off anyway; keep going, say so
            self.rt.print0(f"resuming {len(rngs)} rank(s) as {self.rt.world}: random streams restart from rank 0's")
        rng = rngs[self.rt.rank] if self.rt.rank < len(rngs) else rngs[0]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.rt.device)
        self.state = TrainState(**ckpt["meta"]["train_state"])
        self.saved = (self.state.step, ckpt["dir"])

    # -------------------------------------------------------------------------------------- one step

    def curriculum_share(self) -> float:
        """``data.curriculum``: the share of the shortest sequences that the run's progress asks for now."""
        st = self.state
        return progress_share(run_progress(self.cfg, st.step, st.elapsed), self.cfg.data.curriculum)

    def micro_batches(self, stream: Iterator[tuple[int, int, Epoch, Batch]]
                      ) -> tuple[list[Batch], tuple[int, int], dict[int, Epoch]]:
        """The next ``accum`` batches, the data position after them (committed once the step succeeds), and the
        plans of the epochs they came from."""
        out, plans = [], {}
        pos = (self.state.epoch, self.state.batch)
        for _ in range(self.cfg.train.accum):
            epoch, b, plan, batch = next(stream)
            pos, plans[epoch] = (epoch, b + 1), plan
            out.append(batch.to(self.rt.device))
        return out, pos, plans

    def step(self, micro: list[Batch]) -> dict[str, float]:
        """One optimizer step over ``micro`` batches. Returns logged metrics (global means)."""
        cfg, rt, st = self.cfg, self.rt, self.state
        self.net.train()
        counts = global_counts(micro, rt)
        sums: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext()
            if rt.distributed and i < len(micro) - 1:
                sync = self.net.no_sync()
            with sync:
                with rt.autocast(cfg.train.bf16):
                    out = self.net(mb.tokens, mb.attention_mask, mb.prompt_end, tap=self.shaper.tap(),
                                   detach_steps=self.detach_steps, checkpoint=cfg.train.checkpoint_steps)
                    loss, parts = compute_loss(out, mb, cfg, st.l1_coef, counts, st.attn_l1_coef)
                    extra = self.shaper.extra_loss(counts)
                    if extra is not None:
                        loss = loss + extra
                loss.backward()
            self.shaper.after_backward(counts)
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.float()
        shaping = self.shaper.finish()  # SARS: meta gradients (all-reduced) join the routing gradients here
        # all-reduce the logged sums and the finiteness verdict in one go
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys])
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else \
            torch.zeros((), device=rt.device)
        finite = torch.isfinite(packed).all() & torch.isfinite(gnorm)
        packed = torch.cat([torch.where(torch.isfinite(packed), packed, torch.zeros_like(packed)),
                            (~finite).float()[None]])
        rt.all_reduce_(packed)
        bad = bool(packed[-1] > 0)
        g = dict(zip(keys, packed[:-1].tolist()))
        # lm, act, l1 and loss arrive pre-divided by (global count / world): their all-reduced sum is world x mean
        metrics = {k: g[k] / rt.world for k in ("loss", "lm", "act_halt", "act_continue", "l1")}
        world_counts = {"targets": float(counts.targets) * rt.world, "samples": float(counts.samples) * rt.world,
                        "tokens": float(counts.tokens) * rt.world}
        metrics["lm_first"] = g["lm_first_sum"] / world_counts["targets"]
        metrics["lm_last"] = g["lm_last_sum"] / world_counts["targets"]
        metrics["acc_last"] = g["acc_last_sum"] / world_counts["targets"]
        metrics["solved_last"] = g["solved_last_sum"] / world_counts["samples"]
        metrics["halt_step"] = g["halt_step_sum"] / world_counts["samples"]
        metrics["active_experts"] = g["active_sum"] / world_counts["tokens"]
        if "attn_active_sum" in g:
            metrics["attn_l1"] = g["attn_l1"] / rt.world
            metrics["attn_active_experts"] = g["attn_active_sum"] / world_counts["tokens"]

        lr_f = lr_factor(cfg, st.step, st.elapsed)
        if bad:
            st.bad_in_row += 1
            st.bad_total += 1
            self.optimizer.zero_grad(set_to_none=True)
            # the sums of a non-finite step are meaningless: log only that it was skipped
            metrics = {"skipped": 1.0, "lr": cfg.train.lr * lr_f, "l1_coef": st.l1_coef, "tokens": 0.0}
            if st.bad_in_row >= cfg.train.max_bad_steps:
                raise TrainingStopped(self.stop_message())
            return metrics
        st.bad_in_row = 0
        metrics.update(shaping)
        if cfg.train.grad_clip > 0:
            gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.train.lr * group["lr_mult"] * lr_f
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, st.step)
        if self.sparsity is not None:  # move the L1 coefficients toward the sparsity targets
            st.l1_coef = self.sparsity.next_coef(st.l1_coef, metrics["active_experts"])
        if self.attn_sparsity is not None:
            st.attn_l1_coef = self.attn_sparsity.next_coef(st.attn_l1_coef, metrics["attn_active_experts"])
        st.tokens += int(world_counts["tokens"])
        metrics.update(grad_norm=float(gnorm), lr=cfg.train.lr * lr_f, l1_coef=st.l1_coef, skipped=0.0,
                       tokens=world_counts["tokens"])
        if self.attn_sparsity is not None:
            metrics["attn_l1_coef"] = st.attn_l1_coef
        return metrics

    def stop_message(self) -> str:
        """What stopping after a non-finite streak leaves: the newest checkpoint, saved before the streak (none is
        saved during one), to resume from."""
        st, run = self.state, self.run_dir
        text = (f"{st.bad_in_row} non-finite steps in a row at step {st.step + 1} "  # numbered as logged, from 1
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); ")
        last = checkpoint.latest(run) if run is not None else None
        if last is None:
            return text + "no checkpoint was saved before them"
        return (text + f"the newest checkpoint, from before them, is {last}: resume with `dyntrm train --resume "
                       f"{run}` (train.* may change, e.g. a lower train.lr)")

    def ema_model(self) -> ArcTransformer:
        """A copy of the model carrying the EMA weights (or the raw weights when EMA is off), in eval mode.
        Built under a forked RNG: evaluating must not move the training run's random stream."""
        devices = [self.rt.device] if self.rt.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            m = ArcTransformer(self.cfg.model).to(self.rt.device)
        state = self.ema.state_dict() if self.ema is not None else self.model.state_dict()
        m.load_state_dict({k: v.to(self.model.state_dict()[k].dtype) for k, v in state.items()})
        return m.eval()


def write_run_files(run_dir: Path, cfg: Config) -> None:
    write_json(run_dir / "config.json", to_dict(cfg))
    write_json(run_dir / "run.json", checkpoint.run_info())


class Reporter:
    """Rank-0 progress: a live rich bar on a terminal, one plain line per log step otherwise (logs, CI)."""

    FIELDS = ("loss", "lm", "act_halt", "l1", "lr", "tok/s", "active", "halt", "acc")

    def __init__(self, rt: Runtime, total: int, start: int, live: bool | None = None):
        self.enabled = rt.is_main
        self.live = self.enabled and (sys.stdout.isatty() if live is None else live)
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.description}"))
            self.task = self.progress.add_task("", total=total, completed=start)
            self.progress.start()

    @staticmethod
    def line(m: dict[str, float], left_s: float) -> str:
        g = lambda k: m.get(k, float("nan"))  # noqa: E731  (a window of skipped steps logs few keys)
        text = (f"loss {g('loss'):.4f} (lm {g('lm'):.4f} act {g('act_halt') + g('act_continue'):.3f} "
                f"l1 {g('l1'):.3f}) lr {g('lr'):.2e} {g('tok_per_s'):.0f} tok/s active {g('active_experts'):.2f} "
                f"halt {g('halt_step'):.2f} acc {g('acc_last'):.3f} solved {g('solved_last'):.3f} "
                f"left {left_s / 60:.1f} min")
        if m.get("skipped_steps"):
            text += f" | {m['skipped_steps']:.0f} non-finite steps skipped"
        return text

    def update(self, step: int, m: dict[str, float] | None, left_s: float) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=self.line(m, left_s) if m else "")
        elif m is not None:
            print(f"step {step:6d} | {self.line(m, left_s)}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          rt: Runtime | None = None, live: bool | None = None, on_eval=None) -> tuple[Trainer, dict[str, float]]:
    """Train into ``run_dir``, continuing its run (``resume``), replacing it (``overwrite``), or into a directory
    that holds none (``rundir.py``); rank 0 holds the directory's lock throughout.

    ``on_eval(trainer, metrics_path)`` runs every ``train.eval_every`` steps (default: the EMA model on a fixed
    subset of the evaluation split, logged to metrics.jsonl). Returns the trainer and the last logged metrics.
    Raises :class:`TrainingStopped` after too many non-finite steps (naming the checkpoint to resume from).
    """
    rt = rt or setup(cfg.train.threads)
    run_dir = Path(run_dir)
    rundir.check(run_dir, resume=resume, overwrite=overwrite)  # every rank, before any file is touched
    say = lambda m: rt.print0(m, file=sys.stderr)  # noqa: E731
    with rundir.lock(run_dir, say) if rt.is_main else contextlib.nullcontext():
        tr = Trainer(cfg, rt, run_dir, resume=resume)  # a refused resume raises here, before any file is touched
        if rt.is_main:
            rundir.prepare(run_dir, overwrite=overwrite, say=say)
            write_run_files(run_dir, cfg)
        rt.barrier()
        return tr, loop(tr, live, on_eval or evaluate_subset)


def loop(tr: Trainer, live: bool | None, on_eval) -> dict[str, float]:
    """The training loop: {step, log, eval every k, save every k}; Ctrl-C saves and stops cleanly. Returns the last
    logged metrics."""
    cfg, rt, run_dir = tr.cfg, tr.rt, tr.run_dir
    st, t = tr.state, cfg.train
    metrics_path = run_dir / "metrics.jsonl"
    stream = tr.data.iterate(st.epoch, st.batch, st.share, tr.curriculum_share if cfg.data.curriculum > 0 else None)
    reporter = Reporter(rt, t.steps, st.step, live)
    last: dict[str, float] = {}
    seen_epoch = -1
    said_skipped = 0  # the skipped-sequence count last printed
    window_tokens, window_time, window_metrics = 0.0, 0.0, []
    interrupted = InterruptFlag()

    def save_sound() -> None:
        # Never during a non-finite streak: its state is the streak's, and pruning (train.keep) would delete the
        # checkpoints from before it, the ones to resume from. Skipped steps leave the weights as they were.
        if st.bad_in_row == 0:
            tr.save()

    try:
        while st.step < t.steps:
            t0 = time.perf_counter()
            micro, pos, plans = tr.micro_batches(stream)
            for epoch, plan in plans.items():
                if epoch > seen_epoch and rt.is_main:  # first batch of an epoch (or of a resumed run)
                    append_jsonl(metrics_path, {"kind": "epoch", "step": st.step, "epoch": epoch,
                                                "sequences": plan.total, "skipped_over_max_len": plan.skipped,
                                                "deferred_by_curriculum": plan.deferred,
                                                "curriculum_share": plan.share,
                                                "dropped_batches": plan.dropped, "batches": len(plan) * rt.world})
                    if plan.skipped and plan.skipped != said_skipped:  # said again only when it changes
                        rt.print0(f"epoch {epoch}: {plan.skipped} of {plan.total} sequences exceed "
                                  f"data.max_len={cfg.data.max_len} and were skipped (each epoch's count: "
                                  f"{metrics_path})")
                    said_skipped = plan.skipped
                seen_epoch = max(seen_epoch, epoch)
            m = tr.step(micro)
            dt = time.perf_counter() - t0
            st.elapsed += dt
            st.step += 1
            st.epoch, st.batch = pos
            st.share = plans[st.epoch].share
            window_tokens += m.get("tokens", 0.0)
            window_time += dt
            window_metrics.append(m)
            stop = t.time_budget_s > 0 and st.elapsed >= t.time_budget_s
            if rt.distributed:  # rank 0's clock decides the budget, the lr and the curriculum (every rank takes
                # its elapsed time); any rank's Ctrl-C stops all at this step
                main = rt.is_main
                flags = torch.tensor([float(stop) if main else 0.0, float(interrupted.set), st.elapsed if main else 0.0],
                                     dtype=torch.float64, device=rt.device)
                rt.all_reduce_(flags, torch.distributed.ReduceOp.MAX)
                stop, interrupted.set, st.elapsed = bool(flags[0]), bool(flags[1]), float(flags[2])
            if interrupted.set:
                reporter.close()
                rt.print0(f"interrupted after step {st.step}", file=sys.stderr)
                save_sound()
                raise KeyboardInterrupt
            if st.step % t.log_every == 0 or st.step == t.steps or stop:
                last = window_mean(window_metrics)
                last.update(step=st.step, epoch=st.epoch, tok_per_s=window_tokens / max(window_time, 1e-9),
                            elapsed_s=st.elapsed, tokens_seen=st.tokens, skipped_steps=st.bad_total)
                if rt.is_main:
                    append_jsonl(metrics_path, {"kind": "train", **last})
                reporter.update(st.step, last, time_left(st, cfg, window_time / len(window_metrics)))
                window_tokens, window_time, window_metrics = 0.0, 0.0, []
            if t.eval_every and st.step % t.eval_every == 0:
                on_eval(tr, metrics_path)
            if t.save_every and st.step % t.save_every == 0:
                save_sound()
            if stop:
                break
    finally:
        reporter.close()
        interrupted.restore()
    save_sound()
    return last


def window_mean(window: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the mean over the steps of the window that logged it (skipped steps log fewer keys); lists
    (per-expert usage) are averaged element-wise."""
    out: dict[str, Any] = {}
    for k in dict.fromkeys(k for m in window for k in m):
        vals = [m[k] for m in window if k in m]
        if isinstance(vals[0], list):
            out[k] = [sum(col) / len(vals) for col in zip(*vals)]
        else:
            out[k] = sum(vals) / len(vals)
    return out


class InterruptFlag:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the current step, save and exit; a second one
    interrupts at once. Only installed in the main thread."""

    def __init__(self):
        self.set = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def time_left(st: TrainState, cfg: Config, step_seconds: float) -> float:
    if cfg.train.time_budget_s > 0:
        return max(0.0, cfg.train.time_budget_s - st.elapsed)
    return (cfg.train.steps - st.step) * step_seconds



def evaluate_subset(trainer: Trainer, metrics_path: Path) -> dict[str, Any] | None:
    """In-training evaluation: the EMA model, 1 view, the first ``train.eval_tasks`` test inputs of the eval split
    among its tasks within ``data.max_side`` (a fixed subset); appended to metrics.jsonl by rank 0 while the other
    ranks wait."""
    cfg, rt = trainer.cfg, trainer.rt
    out = None
    if rt.is_main:
        items = split_items(cfg, limit=cfg.train.eval_tasks, max_side=cfg.data.max_side)  # what it trains on
        model = trainer.ema_model()
        results, stats = evaluate_items(model, items, n_views=1, max_len=cfg.data.max_len)
        m = metrics_of(results, stats)
        out = {"kind": "eval", "step": trainer.state.step, "pass@1": m["pass@1"], "pass@2": m["pass@2"],
               "n_test_inputs": m["n_test_inputs"], "mean_steps": m["mean_steps"],
               "decode_tokens_per_s": m["decode_tokens_per_s"]}
        append_jsonl(metrics_path, out)
        rt.print0(f"eval @ step {out['step']}: {score_line(m)} ({out['n_test_inputs']} test inputs), "
                  f"mean steps {out['mean_steps']:.2f}")
    rt.barrier()
    return out
