"""Test-time training (issue 12): each task fine-tunes a copy of the model on its own demonstrations, then answers.

For one task with demonstrations ``d_0 .. d_{n-1}`` (n >= 2), the checkpoint's weights θ, and each view v the
task is decoded under (``--ttt-mode view``, the default)::

    θ_v = a copy of θ; opt = a fresh AdamW over the parameters of θ_v that --ttt-params selects
    for k in 0..K-1:
        batch: B sequences; sequence b takes v(d_j) as its query, j = (k·B + b) mod n (every demonstration in
               turn), the other n - 1 as its context in a random order, as view v shows them (under
               --ttt-colours, the default, with colours 1-9 permuted afresh in each sequence)
        loss = the training loss (loss.compute_loss: deep-supervised LM on output grids + ACT targets, so the
               halting rule learns the task too; train.grad_steps respected)
        θ_v ← AdamW step (the run's groups, betas and gradient clipping; constant learning rate)
    decode the task's test inputs under view v with θ_v; drop θ_v once the task is answered

``--ttt-colours`` also permutes colours 1-9 afresh in each of view mode's sequences; ``--ttt-keep-shape`` leaves the
shape's tokens out of the loss. The copy is meant to learn the task's rule in the frame it answers in; measured, it
fits the demonstrations instead: on held-out geometric tasks it learns their sizes and cells, not the map
(BENCHMARKS ttt-geometry). ``--ttt-mode task`` adapts one copy per task under a fresh random view (dihedral x
colours x order) per sequence and lets it answer every view: it must then keep inferring which transform of the
rule each sequence shows, which the model does poorly (BENCHMARKS "rule selection"); per view measured better on
the ladder and on the demo ("ttt-view", "ttt-demo4-*"), at K x views steps per task.

θ is never written: every task starts from a fresh copy, so nothing of one task reaches another. A test output
cannot enter: the batches are built from the demonstrations alone (:func:`loo_batch` never sees an ``EvalItem``,
which carries the target). A task with a single demonstration has no leave-one-out pair: it is answered by θ
itself, said on stderr and counted. Given a seed, everything is deterministic: a task's views depend on
(seed, task id) only, not on which tasks came before it.

``--ttt-lr`` is the learning rate of the parameters trained; under ``all`` the routers keep the recipe's
``train.routing_lr_mult`` beside it, as in training.

Before it, ``dyntrm eval --ttt-joint-minutes`` (``joint.py``) can fine-tune the checkpoint on the demonstrations of
every task scored, together; the copies then start from that model.

``--ttt-params``: ``all`` (every parameter), ``routing`` (the prototypes and gates of both libraries' routers, a
few thousand numbers: the global experts stay, their composition adapts), ``norms`` (the RMSNorm weights only;
the halt head's bias is *not* included, so ``norms`` is a pure rescaling of the residual stream's features).
"""

from __future__ import annotations

import copy
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from .config import Config, ConfigError, TrainConfig
from .data.arc import Pair, Task
from .data.augment import Augmentation, random_augmentation
from .data.batching import Batch, collate
from .data.dataset import EvalItem
from .data.tokens import PAD, encode
from .loss import compute_loss, detach_steps, global_counts
from .model.context import ModelOutput
from .model.layers import RMSNorm
from .optim import param_groups
from .runtime import Runtime

PARAM_SETS = ("all", "routing", "norms")
MODES = ("task", "view")
SIZES = ("copy", "checkpoint")


def trainable(model: nn.Module, which: str) -> list[tuple[str, nn.Parameter]]:
    """The named parameters that ``--ttt-params which`` trains."""
    if which == "all":
        return list(model.named_parameters())
    if which == "routing":  # DynSIHA+'s and DynMoE's routers: r = h·Pᵀ/√d − g
        return [(n, p) for n, p in model.named_parameters() if n.endswith(".proto") or n.endswith(".gate")]
    if which == "norms":
        return [(f"{n}.weight", m.weight) for n, m in model.named_modules() if isinstance(m, RMSNorm)]
    raise ConfigError(f"--ttt-params {which!r}: expected one of {', '.join(PARAM_SETS)}")


def loo_batch(task_id: str, demos: Sequence[Pair], queries: Sequence[int], rng: np.random.Generator, *,
              header: bool, geometry: bool = True, colours: bool | None = None) -> Batch:
    """Leave-one-out sequences of one task's demonstrations: for each index j in ``queries``, ``demos[j]`` is the
    query and the others its context, under a fresh random view (``geometry=False``: no dihedral transform, only the
    order shuffled and, if ``colours`` (default: as ``geometry``), the colours 1-9 permuted). Given demonstrations
    only, by design."""
    seqs = []
    colours = geometry if colours is None else colours
    for j in queries:
        context = tuple(demos[:j]) + tuple(demos[j + 1:])
        aug = random_augmentation(rng, len(context), dihedral_=geometry, colours=colours)
        view = aug.task(Task(task_id, context, (demos[j],)))
        seqs.append(encode([*view.train, view.test[0]], header=header))
    return collate(seqs, [task_id] * len(seqs))


def task_loss(model: nn.Module, batch: Batch, cfg: Config) -> torch.Tensor:
    """The training loss of one batch as the only batch of a one-process step (no L1 term: see :class:`TTT`)."""
    device = next(model.parameters()).device
    rt = Runtime(device)
    counts = global_counts([batch], rt)  # from the batch where it was built: no device-to-host sync
    batch = batch.to(device)
    with rt.autocast(cfg.train.bf16):
        out = model(batch.tokens, batch.attention_mask, batch.prompt_end, detach_steps=detach_steps(cfg))
        loss, _ = compute_loss(out, batch, cfg, 0.0, counts)
    return loss


def pad_batch(batch: Batch, T: int) -> Batch:
    """``batch`` right-padded to ``T`` positions (the padding is not real: no target, no answer)."""
    extra = T - batch.tokens.shape[1]
    if extra == 0:
        return batch
    pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)  # noqa: E731
    return Batch(pad(batch.tokens, PAD), pad(batch.attention_mask, False), pad(batch.target, False),
                 pad(batch.answer, False), batch.prompt_end, pad(batch.changed, False), batch.ids)


@dataclass(frozen=True)
class Job:
    """One copy to adapt: a task's demonstrations, and whether its sequences are drawn under random views
    (``geometry``, ``--ttt-mode task``) or in the demonstrations' frame (view mode)."""

    task_id: str
    demos: tuple[Pair, ...]
    geometry: bool = True


@dataclass(frozen=True)
class TTT:
    """Test-time training settings. ``recipe`` is the checkpoint's training config: its loss settings (deep
    supervision, ACT weight and gamma, grad_steps), AdamW betas, weight decay, routing lr multiplier and gradient
    clipping are reused. DynMoE's L1 coefficient is 0 here: it is a controller's state that moves over hundreds of
    steps toward a sparsity target; K steps on one task should keep the activity the checkpoint has."""

    steps: int
    lr: float = 1e-3
    params: Literal["all", "routing", "norms"] = "all"
    batch: int = 4  # leave-one-out sequences per step
    seed: int = 0
    recipe: TrainConfig = field(default_factory=TrainConfig)
    mode: Literal["task", "view"] = "view"
    colours: bool = True  # view mode: each leave-one-out sequence also under a fresh permutation of colours 1-9
    sizes: Literal["copy", "checkpoint"] = "checkpoint"  # who writes each answer's size header: the checkpoint before
    #                                                      adaptation (the copy then writes the cells), or the copy
    shape_loss: bool = True  # False: the shape's tokens (size header, ROW, END) leave the loss (meant to keep the
    #                          checkpoint's sizes; measured: they drift further, BENCHMARKS ttt-geometry keep-shape)
    copies: int = 1  # copies adapted side by side (torch.func.vmap over their stacked weights); 1: one at a time

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"--ttt-steps {self.steps}: must be >= 0 (0: no test-time training)")
        if self.batch < 1:
            raise ConfigError(f"--ttt-batch {self.batch}: must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"--ttt-lr {self.lr}: must be > 0")
        if self.params not in PARAM_SETS:
            raise ConfigError(f"--ttt-params {self.params!r}: expected one of {', '.join(PARAM_SETS)}")
        if self.mode not in MODES:
            raise ConfigError(f"--ttt-mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.sizes not in SIZES:
            raise ConfigError(f"--ttt-sizes {self.sizes!r}: expected one of {', '.join(SIZES)}")
        if self.copies < 1:
            raise ConfigError(f"--ttt-copies {self.copies}: must be >= 1")

    def adapt(self, model: nn.Module, task_id: str, demos: Sequence[Pair], *, geometry: bool = True
              ) -> tuple[nn.Module, dict]:
        """A copy of ``model`` fine-tuned on ``demos`` (n >= 2), in eval mode, and a record of the run.
        ``geometry=False``: the leave-one-out sequences keep the demonstrations' frame, and their colours unless
        ``self.colours``."""
        t0 = time.perf_counter()
        cfg = self.loss_config(model)
        tuned = copy.deepcopy(model).train()
        chosen = {id(p) for _, p in trainable(tuned, self.params)}
        for p in tuned.parameters():  # no weight gradients where nothing is trained
            p.requires_grad_(id(p) in chosen)
        groups = self.optimizer_groups(tuned, cfg, {id(p): p for p in tuned.parameters() if id(p) in chosen})
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=(self.recipe.beta1, self.recipe.beta2))
        params = [p for g in groups for p in g["params"]]
        rng = self.rng(task_id)
        job, losses, skipped = Job(task_id, tuple(demos), geometry), [], 0
        for k in range(self.steps):
            loss = task_loss(tuned, self.step_batch(job, k, rng, model.cfg.size_header), cfg)
            loss.backward()
            gnorm = nn.utils.clip_grad_norm_(params, self.recipe.grad_clip or float("inf"))  # 0: no clipping
            if torch.isfinite(loss) and torch.isfinite(gnorm):
                opt.step()
            else:  # as in training: a non-finite step is skipped, not applied
                skipped += 1
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        tuned.requires_grad_(False)
        return tuned.eval(), self._record(task_id, time.perf_counter() - t0, losses, skipped,
                                          sum(p.numel() for p in params))

    def step_batch(self, job: Job, k: int, rng: np.random.Generator, header: bool) -> Batch:
        """Step k's leave-one-out sequences of ``job``: ``batch`` of them, every demonstration in turn the query."""
        queries = [(k * self.batch + b) % len(job.demos) for b in range(self.batch)]
        return loo_batch(job.task_id, job.demos, queries, rng, header=header, geometry=job.geometry,
                         colours=job.geometry or self.colours)

    @staticmethod
    def _record(task_id: str, seconds: float, losses: Sequence[float], skipped: int, numbers: int) -> dict:
        """What one adapted copy reports."""
        return {"task": task_id, "seconds": seconds, "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None, "skipped_steps": skipped, "trained_numbers": numbers}

    def loss_config(self, model: nn.Module) -> Config:
        """The config of the TTT loss: the recipe's, with every demonstration output trained on (a checkpoint's
        first_output_weight would drop the only context output of a two-demonstration task) and, under
        --ttt-keep-shape, the shape's tokens weighing 0."""
        recipe = replace(self.recipe, first_output_weight=1.0,
                         **({} if self.shape_loss else {"structure_weight": 0.0}))
        return Config(model=model.cfg, train=recipe)

    def optimizer_groups(self, model: nn.Module, cfg: Config, trained: dict[int, torch.Tensor]) -> list[dict]:
        """AdamW groups over ``trained`` (the tensor that stands for each trained parameter of ``model``, by the
        parameter's id), grouped as in training. --ttt-lr is the lr of what is trained: the recipe's routing
        multiplier applies only beside the computation parameters (``all``), else --ttt-params routing would run at
        a tenth of the lr asked for."""
        groups = [dict(g, params=[trained[id(p)] for p in g["params"] if id(p) in trained])
                  for g in param_groups(model, cfg)]
        return [dict(g, lr=self.lr * (g["lr_mult"] if self.params == "all" else 1.0)) for g in groups if g["params"]]

    def rng(self, task_id: str) -> np.random.Generator:
        """The leave-one-out sequences' randomness for one task: (seed, task id) only."""
        return np.random.default_rng([self.seed, zlib.crc32(task_id.encode())])

    def adapt_copies(self, model: nn.Module, jobs: Sequence[Job]) -> tuple[list[nn.Module], list[dict]]:
        """:meth:`adapt` for each of ``jobs`` at once: K copies side by side, their trained parameters stacked
        (K, ...), one ``torch.func.vmap`` forward and one backward per step (``ArcTransformer.forward(vmapped=True)``).

        Each copy sees exactly what it would alone: its own leave-one-out sequences from its own random stream,
        its own loss (normalised by its own tokens), its own gradient clipping, and AdamW's update, which is
        elementwise, on its slice. The sequences of all copies are right-padded to one length, which changes no
        real token's value. A copy whose loss or gradient is not finite keeps its weights and moments (AdamW's
        step count, shared by the slices, still advances: the only difference from adapting alone, on a rare
        path). Returns the adapted copies (eval mode) and a record each; the records' seconds are the whole
        run's divided among the copies."""
        t0 = time.perf_counter()
        cfg = self.loss_config(model)
        base = copy.deepcopy(model).train()
        base.requires_grad_(False)
        K, names = len(jobs), [n for n, _ in trainable(base, self.params)]
        own = dict(base.named_parameters())
        stacked = {n: own[n].detach().unsqueeze(0).repeat(K, *[1] * own[n].dim()).requires_grad_() for n in names}
        shared = {**{n: p for n, p in own.items() if n not in stacked}, **dict(base.named_buffers())}
        groups = self.optimizer_groups(base, cfg, {id(own[n]): t for n, t in stacked.items()})
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=(self.recipe.beta1, self.recipe.beta2))
        params = list(stacked.values())
        device, ds, clip = params[0].device, detach_steps(cfg), self.recipe.grad_clip or float("inf")
        rt = Runtime(device)

        def forward(weights: dict[str, torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor,
                    end: torch.Tensor) -> dict[str, torch.Tensor]:
            out = functional_call(base, {**shared, **weights}, (tokens, mask, end),
                                  {"detach_steps": ds, "vmapped": True})
            return {k: v for k, v in vars(out).items() if isinstance(v, torch.Tensor)}

        rngs = [self.rng(job.task_id) for job in jobs]
        losses, skipped, reached = [], torch.zeros(K, dtype=torch.long), []
        for k in range(self.steps):
            batches = [self.step_batch(job, k, rng, model.cfg.size_header) for job, rng in zip(jobs, rngs)]
            counts = [global_counts([b], rt) for b in batches]  # on the host batches: no device-to-host sync
            T = max(b.tokens.shape[1] for b in batches)
            batches = [pad_batch(b, T).to(device) for b in batches]
            with rt.autocast(self.recipe.bf16):
                outs = vmap(forward)(stacked, *(torch.stack([getattr(b, f) for b in batches])
                                                for f in ("tokens", "attention_mask", "prompt_end")))
                loss_K = torch.stack([compute_loss(ModelOutput(**{f: v[c] for f, v in outs.items()}, grad_from=ds),
                                                   b, cfg, 0.0, n)[0]
                                      for c, (b, n) in enumerate(zip(batches, counts))])
            loss_K.sum().backward()
            reached = [p for p in params if p.grad is not None]  # as clip_grad_norm_ and AdamW: the others stay
            norm_K = torch.stack([p.grad.flatten(1).norm(dim=1) for p in reached]).norm(dim=0)
            scale_K = (clip / (norm_K + 1e-6)).clamp(max=1.0)  # clip_grad_norm_ per copy
            for p in reached:
                p.grad.mul_(scale_K.view(-1, *[1] * (p.dim() - 1)).to(p.grad.dtype))
            bad_K = ~(torch.isfinite(loss_K.detach()) & torch.isfinite(norm_K)).cpu()
            kept = self._hold(opt, reached, bad_K) if bad_K.any() else None
            opt.step()
            if kept is not None:
                self._restore(opt, reached, bad_K, kept)
            skipped += bad_K.long()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_K.detach().float().cpu())
        numbers = sum(t[0].numel() for t in stacked.values())
        weights = {n: t.detach() for n, t in stacked.items()}
        del opt, params, reached, stacked  # the optimizer's moments go before K full copies are built
        seconds = (time.perf_counter() - t0) / K
        tuned, records = [], []
        for c, job in enumerate(jobs):
            m = copy.deepcopy(model)
            with torch.no_grad():
                for n, t in m.named_parameters():
                    if n in weights:
                        t.copy_(weights[n][c])
            tuned.append(m.requires_grad_(False).eval())
            records.append(self._record(job.task_id, seconds, [float(x[c]) for x in losses], int(skipped[c]),
                                        numbers))
        return tuned, records

    @staticmethod
    def _hold(opt: torch.optim.Optimizer, params: list[torch.Tensor], bad_K: torch.Tensor) -> list:
        """The weights and AdamW moments of the copies ``bad_K``, before a step they must not take."""
        held = []
        for p in params:
            bad = bad_K.to(p.device)
            p.grad[bad] = 0  # no NaN into the shared step
            state = opt.state.get(p, {})
            held.append((p.detach()[bad].clone(),
                         {s: state[s][bad].clone() for s in ("exp_avg", "exp_avg_sq") if s in state}))
        return held

    @staticmethod
    def _restore(opt: torch.optim.Optimizer, params: list[torch.Tensor], bad_K: torch.Tensor, held: list) -> None:
        with torch.no_grad():
            for p, (w, moments) in zip(params, held):
                bad = bad_K.to(p.device)
                p[bad] = w
                state = opt.state[p]
                for s in ("exp_avg", "exp_avg_sq"):
                    state[s][bad] = moments.get(s, torch.zeros_like(w))

    def per_task(self, model: nn.Module, items: Sequence[EvalItem], owners: Sequence[tuple[int, Augmentation]]
                 ) -> Iterator[tuple[list[tuple[nn.Module, list[int]]], dict]]:
        """For each task among ``owners`` (the (item index, view) of every prompt to decode): the models that answer
        it, each with the indices of the prompts it answers, and a record. ``mode="task"``: one copy adapted under
        random views answers every prompt of the task; ``mode="view"``: one copy per view, adapted on the
        demonstrations as that view shows them (their order shuffled and, under ``colours``, their colours 1-9
        permuted), answers that view's prompts. ``copies`` > 1: the copies of consecutive tasks are adapted
        ``copies`` at a time (:meth:`adapt_copies`), each exactly as it would be alone.
        A task with a single demonstration is answered by ``model`` itself. The copies are dropped once the caller
        asks for the next task."""
        prompts_of: dict[str, list[int]] = {}
        for k, (i, _) in enumerate(owners):
            prompts_of.setdefault(items[i].task_id, []).append(k)
        plans: list[tuple[str, list[int], list[tuple[Job, list[int]]]]] = []  # (task, its prompts, its copies)
        for task_id, sel in prompts_of.items():
            demos = tuple(items[owners[sel[0]][0]].demos)
            if len(demos) < 2:
                plans.append((task_id, sel, []))
            elif self.mode == "task":
                plans.append((task_id, sel, [(Job(task_id, demos), sel)]))
            else:
                by_view: dict[Augmentation, list[int]] = {}
                for k in sel:
                    by_view.setdefault(owners[k][1], []).append(k)
                plans.append((task_id, sel, [(Job(task_id, tuple(v.pair(d) for d in demos), geometry=False), ks)
                                             for v, ks in by_view.items()]))
        start = 0
        while start < len(plans):  # the next tasks whose copies fit in one run of `copies` (at least one task)
            stop, n = start + 1, len(plans[start][2])
            while stop < len(plans) and n + len(plans[stop][2]) <= self.copies:
                n, stop = n + len(plans[stop][2]), stop + 1
            tuned, records = self._adapt_all(model, [job for _, _, jobs in plans[start:stop] for job, _ in jobs])
            for task_id, sel, jobs in plans[start:stop]:
                if not jobs:
                    print(f"{task_id}: a single demonstration leaves no leave-one-out pair: answered without "
                          f"test-time training", file=sys.stderr, flush=True)
                    yield [(model, sel)], {"task": task_id, "single_demo": True}
                    continue
                mine, tuned = tuned[:len(jobs)], tuned[len(jobs):]
                recs, records = records[:len(jobs)], records[len(jobs):]
                yield [(m, ks) for m, (_, ks) in zip(mine, jobs)], self._task_record(recs)
                del mine
            start = stop

    def _adapt_all(self, model: nn.Module, jobs: Sequence[Job]) -> tuple[list[nn.Module], list[dict]]:
        """Every job's adapted copy and record: one at a time (``copies`` = 1), else ``copies`` at a time."""
        if self.copies == 1:
            done = [self.adapt(model, j.task_id, j.demos, geometry=j.geometry) for j in jobs]
            return [m for m, _ in done], [r for _, r in done]
        tuned, records = [], []
        for i in range(0, len(jobs), self.copies):
            m, r = self.adapt_copies(model, jobs[i:i + self.copies])
            tuned += m
            records += r
        return tuned, records

    def _task_record(self, records: Sequence[dict]) -> dict:
        """One task's record from its copies' (view mode: one per view)."""
        if self.mode == "task":  # one copy
            return records[0]
        return {**records[0], "seconds": sum(r["seconds"] for r in records),
                "loss_first": float(np.mean([r["loss_first"] for r in records])) if self.steps else None,
                "loss_last": float(np.mean([r["loss_last"] for r in records])) if self.steps else None,
                "skipped_steps": sum(r["skipped_steps"] for r in records), "views": len(records)}

    def summary(self, records: Sequence[dict]) -> dict:
        """The TTT fields of an evaluation's stats: settings, seconds per adapted task, losses, skipped tasks."""
        done = [r for r in records if "seconds" in r]

        def mean(key: str) -> float | None:
            values = [r[key] for r in done if r[key] is not None]
            return float(np.mean(values)) if values else None

        return {"ttt_steps": self.steps, "ttt_lr": self.lr, "ttt_params": self.params, "ttt_batch": self.batch,
                "ttt_mode": self.mode, "ttt_copies": self.copies, "ttt_colours": self.colours, "ttt_shape_loss": self.shape_loss,
                "ttt_tasks": len(done), "ttt_single_demo_tasks": sum(1 for r in records if r.get("single_demo")),
                "ttt_seconds": float(sum(r["seconds"] for r in done)), "ttt_seconds_per_task": mean("seconds"),
                "ttt_trained_numbers": done[0]["trained_numbers"] if done else 0,
                "ttt_loss_first": mean("loss_first"), "ttt_loss_last": mean("loss_last"),
                "ttt_skipped_steps": sum(r["skipped_steps"] for r in done)}
