"""View-consistent scoring (issue 12): rank candidate answers by their log-likelihood under every view of the task.

Votes count how many views *decoded* a grid; this asks how likely every view finds it. For a candidate ``g`` (an
answer already mapped back to the task's own frame) and each view ``v`` the item was decoded under::

    sequence = prompt(v) + tokens(v(g)) + END          # v(g): the view's forward transform (dihedral, colours)
    score(g, v) = Σ over the answer tokens (size header, cells, row separators, END) of log p(token | prefix)
    score(g) = Σ_v score(g, v)

read, teacher-forced, from the **halting step's** logits: the forward pass is the inference recursion
(``model(..., halt=True)``), where each sample stops at its ACT step, decided at the prompt's end exactly as when
decoding, so a candidate is judged by the computation that would have written it. The distribution is the model's
full softmax, not the grid-constrained one of decoding: an answer's shape is then part of what is judged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data.augment import Augmentation
from .data.batching import padded
from .data.tokens import END, PAD, grid_tokens


@torch.no_grad()
def answer_logprobs(model: nn.Module, prompts: Sequence[np.ndarray], answers: Sequence[np.ndarray], *,
                    tokens_per_batch: int = 131072) -> list[float]:
    """Sum of the log-probabilities of ``answers[i]`` following ``prompts[i]`` (teacher-forced, at each sample's
    halting step), for sequences batched by length within ``tokens_per_batch``."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out = [0.0] * len(prompts)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * padded(lengths[order[j]]) <= tokens_per_batch:
            j += 1
        idx = order[i:j]
        T = padded(max(lengths[k] for k in idx))
        tokens = torch.full((len(idx), T), PAD, dtype=torch.long)
        for b, k in enumerate(idx):
            tokens[b, :lengths[k]] = torch.from_numpy(np.concatenate([prompts[k], answers[k]]))
        tokens = tokens.to(device)
        mask = tokens != PAD
        prompt_end = torch.tensor([len(prompts[k]) - 1 for k in idx], device=device)
        logp_BTV = torch.log_softmax(model(tokens, mask, prompt_end, halt=True).final_logits.float(), -1)
        for b, k in enumerate(idx):
            start, end = len(prompts[k]), lengths[k]  # token t is predicted at position t - 1
            pos = torch.arange(start - 1, end - 1, device=device)
            out[k] = float(logp_BTV[b, pos, tokens[b, start:end]].sum())
        i = j
    return out


def candidate_likelihoods(model: nn.Module, jobs: Sequence[tuple[Sequence[tuple[Augmentation, np.ndarray]],
                                                                  Sequence[np.ndarray]]],
                          *, tokens_per_batch: int = 131072) -> list[list[float]]:
    """For each job ``(prompts, grids)`` (the encoded prompt of every view it was decoded under, and its candidate
    grids in the task's frame), each candidate's total answer log-likelihood over those views. All jobs' sequences
    go through :func:`answer_logprobs` together, batched by length."""
    header = bool(model.cfg.size_header)
    prompts, answers, spans = [], [], []
    for views_prompts, grids in jobs:
        spans.append((len(prompts), len(grids), len(views_prompts)))
        for g in grids:
            for v, p in views_prompts:
                prompts.append(p)
                answers.append(np.concatenate([grid_tokens(v.grid(g), header), [END]]))
    scores = np.asarray(answer_logprobs(model, prompts, answers, tokens_per_batch=tokens_per_batch))
    return [[float(x) for x in scores[start:start + n * k].reshape(n, k).sum(1)] if n else []
            for start, n, k in spans]

