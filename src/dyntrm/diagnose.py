"""Why a model cannot (yet) write a grid: teacher-forced accuracy of its answer tokens, by what each token asks.

Free decoding fails for many reasons at once; teacher forcing separates them. Every answer token (the test
output of a held-out item, given the true prefix) falls in one class:

- ``size``: the two size-header tokens (``model.size_header``): does the model know the output's shape?
- ``row`` / ``end``: row separators and the closing ``END``: does it count the width / the height?
- ``cell_copy``: a cell equal to the test input's cell at the same (row, column) (same-shape answers only):
  can it locate the test input and copy from it?
- ``cell_change``: any other cell (a changed colour, a moved cell, or any cell of an answer of another shape):
  can it apply the rule?

plus ``exact``: the fraction of answers whose every token is predicted right, i.e. what greedy decoding would
solve if it never left the true prefix. Accuracies are at the last recursion step, and ``cell_*@1`` at the first
(what the recursion adds).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .data.arc import Pair
from .data.batching import collate
from .data.dataset import EvalItem
from .data.tokens import encode

CLASSES = ("size", "row", "end", "cell_copy", "cell_change")


def answer_classes(item: EvalItem, header: bool) -> list[str]:
    """The class of every answer token of ``item`` (size header, cells row by row with separators, END)."""
    inp, out = item.input, item.target
    same = inp.shape == out.shape
    labels = ["size", "size"] if header else []
    h, w = out.shape
    for r in range(h):
        labels += ["cell_copy" if same and out[r, c] == inp[r, c] else "cell_change" for c in range(w)]
        labels.append("row" if r < h - 1 else "end")
    return labels


@torch.no_grad()
def answer_accuracy(model, items: Sequence[EvalItem], *, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced accuracy per answer-token class over ``items`` (those with a target), mean over tokens."""
    header = bool(model.cfg.size_header)
    model.eval()
    device = next(model.parameters()).device
    right = {k: 0 for k in CLASSES}
    right_first = {k: 0 for k in CLASSES}
    total = {k: 0 for k in CLASSES}
    exact, n_items = 0, 0
    scored = [it for it in items if it.target is not None]
    for i in range(0, len(scored), batch_size):
        part = scored[i:i + batch_size]
        encs = [encode([*it.demos, Pair(it.input, it.target)], header=header) for it in part]
        b = collate(encs).to(device)
        out = model(b.tokens, b.attention_mask, b.prompt_end)
        pred_last = out.logits[-1].argmax(-1)  # (B, T): the prediction of token t + 1
        pred_first = out.logits[0].argmax(-1)
        for j, (it, enc) in enumerate(zip(part, encs)):
            pos = np.flatnonzero(enc.answer)  # answer tokens, predicted from the position before each
            tgt = torch.from_numpy(enc.tokens[pos]).to(device)
            ok_last = (pred_last[j, pos - 1] == tgt).cpu().numpy()
            ok_first = (pred_first[j, pos - 1] == tgt).cpu().numpy()
            labels = answer_classes(it, header)
            assert len(labels) == len(pos), (len(labels), len(pos))
            for lab, a, f in zip(labels, ok_last, ok_first):
                total[lab] += 1
                right[lab] += int(a)
                right_first[lab] += int(f)
            exact += int(ok_last.all())
            n_items += 1
    res = {k: right[k] / total[k] if total[k] else float("nan") for k in CLASSES}
    res.update({f"{k}@1": right_first[k] / total[k] if total[k] else float("nan")
                for k in ("cell_copy", "cell_change")})
    res["exact"] = exact / max(n_items, 1)
    return res
