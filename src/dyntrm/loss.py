"""The training loss (DESIGN §3.5-§3.6): deep supervision, ACT targets, the DynMoE L1 penalty, global counts.

Loss = deep-supervised LM loss (mean over recursion steps of the token-mean cross-entropy on output grids, the
       shape's tokens weighted by ``train.structure_weight``)
     + act_weight · (BCE(q_halt, halt_t) + BCE(q_continue, continue_t))
     + l1_coef · mean_tokens Σ_e w_e                              (DynMoE sparsity, coefficient adapted per step)
     + attn_l1_coef · mean_(token, head, channel) Σ_e w_e         (sparse attention composition only)

with, per sample and step t, ``halt_t = 1[every answer token is predicted correctly at step t]`` and
``continue_t = γ · max_{t' > t} halt_t'`` (0 at the last step). Every sum is normalised by the *global* count of
its terms over all micro-batches and ranks (:class:`Counts`), so 2 processes or 4 accumulated micro-batches give
the same update as one process on the whole batch (tested). Shapes: ``S`` steps, ``B`` batch, ``T`` time, ``V``
vocabulary, ``M`` positions that enter the LM loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .data.arc import N_COLOURS
from .data.tokens import END
from .data.batching import Batch
from .model import ModelOutput
from .model.dyntrm import should_halt
from .runtime import Runtime


@dataclass
class Counts:
    """Global term counts of one optimizer step (over all micro-batches and ranks), divided by the world size
    because DDP averages gradients: every loss term is a sum divided by its count."""

    targets: torch.Tensor  # predicted output-grid tokens (the LM loss)
    samples: torch.Tensor  # sequences (the ACT losses)
    tokens: torch.Tensor  # real tokens (the L1 penalty, the shapers' means)


def global_counts(micro: list[Batch], rt: Runtime) -> Counts:
    counts = torch.tensor([[float(b.target[:, 1:].sum()), float(b.tokens.shape[0]), float(b.attention_mask.sum())]
                           for b in micro], device=rt.device).sum(0)
    rt.all_reduce_(counts)
    counts = counts.clamp(min=1) / rt.world
    return Counts(counts[0], counts[1], counts[2])


def detach_steps(cfg: Config) -> int:
    """How many leading recursion steps run without gradient under ``train.grad_steps`` (0: full BPTT)."""
    return cfg.model.max_steps - cfg.train.grad_steps if cfg.train.grad_steps else 0


def act_targets(correct_SB: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """halt_t = correct_t; continue_t = γ · max_{t' > t} halt_t' (0 at the last step)."""
    halt = correct_SB.float()
    later = torch.zeros_like(halt)
    if halt.shape[0] > 1:
        # reverse cumulative max over the steps after t
        rev = torch.flip(halt[1:], [0]).cummax(0).values
        later[:-1] = torch.flip(rev, [0])
    return halt, gamma * later


def compute_loss(out: ModelOutput, batch: Batch, cfg: Config, l1_coef: float, counts: Counts,
                 attn_l1_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch (already scaled for accumulation and DDP) and its parts."""
    t = cfg.train
    S, B = out.logits.shape[:2]
    V = out.logits.shape[-1]
    sel_BT = batch.target[:, 1:]  # token t+1 is predicted at position t
    tgt_M = batch.tokens[:, 1:][sel_BT]  # (M,)
    logits_SMV = out.logits[:, :, :-1][:, sel_BT].float()  # only the positions that enter the loss
    ce_SM = F.cross_entropy(logits_SMV.reshape(-1, V), tgt_M.repeat(S), reduction="none").view(S, -1)
    ce_S = ce_SM.sum(1)
    # train.structure_weight: the tokens that fix the answer's shape (size header, ROW, END; every target token that
    # is not a colour) weigh this much, the cells 1; the normaliser stays the count of targets
    # train.change_weight: the cells that copying the input would get wrong weigh this much (same normaliser)
    # train.first_output_weight: the first demonstration's output (up to its END; never the query's answer) weighs
    # this much times the weights above: no earlier pair shows the rule, so its loss can only teach a hedge between
    # the rules the data holds (same normaliser)
    lm_S = ce_S
    if t.structure_weight != 1.0 or t.change_weight != 1.0 or t.first_output_weight != 1.0:
        w_M = torch.where(tgt_M >= N_COLOURS, t.structure_weight, 1.0)
        if t.change_weight != 1.0:
            w_M = torch.where(batch.changed[:, 1:][sel_BT], t.change_weight, w_M)
        if t.first_output_weight != 1.0:
            is_end = batch.tokens == END
            first_BT = ((is_end.cumsum(1) - is_end.long()) == 0) & ~batch.answer  # up to and with the first END
            w_M = w_M * torch.where(first_BT[:, 1:][sel_BT], t.first_output_weight, 1.0)
        lm_S = (ce_SM * w_M).sum(1)
    g = out.grad_from  # steps before g ran without gradient (train.grad_steps): only the later ones are trained
    lm = (lm_S[g:].mean() if t.deep_supervision else lm_S[-1]) / counts.targets

    with torch.no_grad():
        correct_SM = logits_SMV.argmax(-1) == tgt_M
        b_of_M = torch.nonzero(sel_BT, as_tuple=True)[0]
        ans_M = batch.answer[:, 1:][sel_BT]
        wrong_SB = torch.zeros(S, B, device=ce_SM.device).index_add_(
            1, b_of_M[ans_M], (~correct_SM[:, ans_M]).float())
        halt_SB, cont_SB = act_targets(wrong_SB == 0, t.act_gamma)
    bce = lambda q, y: F.binary_cross_entropy_with_logits(q.float(), y, reduction="sum")  # noqa: E731
    act_halt = bce(out.q_halt[g:], halt_SB[g:]) / ((S - g) * counts.samples)
    act_cont = bce(out.q_continue[g:], cont_SB[g:]) / ((S - g) * counts.samples)
    n_real = batch.attention_mask.sum()
    l1 = out.moe_l1 * (n_real / counts.tokens)
    loss = lm + t.act_weight * (act_halt + act_cont) + l1_coef * l1
    if out.attn_l1 is not None:  # model.attn_active: the attention routers' penalty, normalised as DynMoE's
        attn_l1 = out.attn_l1 * (n_real / counts.tokens)
        loss = loss + attn_l1_coef * attn_l1

    with torch.no_grad():
        # the step at which inference would stop each sample (the halting rule on these q values)
        fire_SB = should_halt(out.q_halt, out.q_continue, torch.arange(S, device=out.q_halt.device)[:, None],
                              cfg.model)
        halt_step = fire_SB.float().argmax(0) + 1
        parts = {
            "lm": lm.detach(), "act_halt": act_halt.detach(), "act_continue": act_cont.detach(),
            "l1": (out.moe_l1.detach() * (n_real / counts.tokens)),
            # sums over this micro-batch; divided by the global counts when logged
            "lm_first_sum": ce_S[0].detach(), "lm_last_sum": ce_S[-1].detach(),
            "acc_last_sum": correct_SM[-1].float().sum(), "solved_last_sum": halt_SB[-1].sum(),
            "halt_step_sum": halt_step.float().sum(), "active_sum": out.moe_active * n_real,
        }
        if out.attn_active is not None:
            parts["attn_l1"] = attn_l1.detach()
            parts["attn_active_sum"] = out.attn_active * n_real
    return loss, parts
