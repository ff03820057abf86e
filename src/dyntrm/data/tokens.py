"""Tokens: the vocabulary, task -> sequence, loss masks, tokens -> grid (DESIGN §2, "Serialisation").

A grid is flattened row by row, one token per cell, with ``ROW`` between rows (none after the last row), so the
model has to infer 2-D structure from the separators. A sequence is

    BOS  (IN grid OUT grid END)*  EOS

where the last pair is the query: at evaluation the sequence stops after its ``OUT`` (the *prompt end*) and the
model writes the answer grid and ``END``. The loss covers every output-grid token (demonstration outputs and the
answer), their row separators and the closing ``END``, so the model learns the output's size; never inputs,
specials or padding.

With the size header (``model.size_header``, issue 11) every grid is preceded by its height and width as two
number tokens ``#1``..``#30``: ``IN #h #w grid OUT #h' #w' grid' END``. The answer's shape is then a decision of
two tokens, scored on its own, and decoding under the header writes exactly that shape: its row separators and
``END`` follow from it (:class:`dyntrm.evaluate.GridConstraint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np

from .arc import MAX_SIDE, N_COLOURS, Pair

PAD, BOS, EOS, IN, OUT, END, ROW = range(N_COLOURS, N_COLOURS + 7)
SIZE0 = N_COLOURS + 7  # SIZE0 + n - 1 is the number token #n (n = 1..30) of the size header
N_TOKENS = SIZE0 + MAX_SIDE
VOCAB_SIZE = 48  # embedding / LM-head rows, padded to a multiple of 16; ids >= N_TOKENS are never produced
NAMES = ([str(c) for c in range(N_COLOURS)] + ["<pad>", "<bos>", "<eos>", "<in>", "<out>", "<end>", "<row>"]
         + [f"#{n}" for n in range(1, MAX_SIDE + 1)])


def size_token(n: int) -> int:
    """The number token of a grid side ``n`` (1..30)."""
    return SIZE0 + n - 1


def side_of(token: int) -> int:
    """The grid side a number token names (the inverse of :func:`size_token`); 0 for any other token."""
    return token - SIZE0 + 1 if SIZE0 <= token < N_TOKENS else 0


class GridDecodeError(ValueError):
    """A token sequence that is not a well-formed grid (ragged rows, a special inside, too large, empty)."""


def grid_tokens(grid: np.ndarray, header: bool = False) -> np.ndarray:
    """(h, w) grid -> h*w + h-1 tokens: the rows joined by ROW; with ``header``, ``#h #w`` first."""
    h, w = grid.shape
    out = np.full((h, w + 1), ROW, dtype=np.int64)
    out[:, :w] = grid
    body = out.reshape(-1)[:-1]
    return np.concatenate([[size_token(h), size_token(w)], body]) if header else body


def changed_cells(inp: np.ndarray, out: np.ndarray, header: bool = False) -> np.ndarray:
    """Aligned with ``grid_tokens(out, header)``: the output's cells whose colour differs from the input's cell at
    the same place, where the two grids have one shape (the cells that copying the input would get wrong); False
    on the header and ROW tokens, and everywhere when the shapes differ."""
    h, w = out.shape
    mask = np.zeros((h, w + 1), bool)
    if inp.shape == out.shape:
        mask[:, :w] = out != inp
    body = mask.reshape(-1)[:-1]
    return np.concatenate([[False, False], body]) if header else body


def grid_length(shape: tuple[int, int], header: bool = False) -> int:
    """Length of :func:`grid_tokens` for a grid of ``shape``."""
    h, w = shape
    return h * w + h - 1 + (2 if header else 0)


def tokens_to_grid(tokens: Seq[int] | np.ndarray) -> np.ndarray:
    """Inverse of :func:`grid_tokens`. Raises :class:`GridDecodeError` instead of guessing."""
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if toks.size == 0:
        raise GridDecodeError("empty grid")
    bad = toks[(toks >= N_COLOURS) & (toks != ROW)]
    if bad.size:
        raise GridDecodeError(f"token {NAMES[bad[0]] if bad[0] < N_TOKENS else int(bad[0])} inside a grid")
    seps = np.flatnonzero(toks == ROW)
    bounds = np.concatenate([[-1], seps, [toks.size]])
    widths = np.diff(bounds) - 1
    if (widths == 0).any():
        raise GridDecodeError(f"empty row {int(np.argmax(widths == 0))}")
    if (widths != widths[0]).any():
        r = int(np.argmax(widths != widths[0]))
        raise GridDecodeError(f"ragged grid: row {r} has {widths[r]} cells, row 0 has {widths[0]}")
    h, w = widths.size, int(widths[0])
    if h > MAX_SIDE or w > MAX_SIDE:
        raise GridDecodeError(f"grid of {h}x{w} exceeds {MAX_SIDE}x{MAX_SIDE}")
    return toks[toks != ROW].reshape(h, w).astype(np.uint8)


@dataclass(frozen=True)
class Encoded:
    """One serialised sequence and its masks, all of length T."""

    tokens: np.ndarray  # (T,) int64
    target: np.ndarray  # (T,) bool: token t is predicted (from position t-1) and enters the LM loss
    answer: np.ndarray  # (T,) bool: the query's answer tokens (its output grid and END): the ACT target
    prompt_end: int  # index of the query's OUT token: the last position the prompt alone determines
    changed: np.ndarray  # (T,) bool: output cells unlike the input's cell at that place (changed_cells)

    def __len__(self) -> int:
        return int(self.tokens.size)


def encode(pairs: Seq[Pair], *, with_answer: bool = True, header: bool = False) -> Encoded:
    """Serialise pairs; the last one is the query. ``with_answer=False`` stops after the query's OUT;
    ``header`` puts every grid's size first."""
    if not pairs:
        raise ValueError("encode needs at least one pair")
    parts: list[np.ndarray] = [np.array([BOS])]
    target: list[np.ndarray] = [np.zeros(1, bool)]
    answer: list[np.ndarray] = [np.zeros(1, bool)]
    changed: list[np.ndarray] = [np.zeros(1, bool)]
    prompt_end = 0
    for i, p in enumerate(pairs):
        last = i == len(pairs) - 1
        inp = grid_tokens(p.input, header)
        parts.append(np.concatenate([[IN], inp, [OUT]]))
        target.append(np.zeros(inp.size + 2, bool))
        answer.append(np.zeros(inp.size + 2, bool))
        changed.append(np.zeros(inp.size + 2, bool))
        prompt_end += inp.size + 2
        if last and not with_answer:
            break
        if p.output is None:
            raise ValueError(f"pair {i} has no output to serialise")
        out = np.concatenate([grid_tokens(p.output, header), [END]])
        parts.append(out)
        target.append(np.ones(out.size, bool))
        answer.append(np.full(out.size, last))
        changed.append(np.append(changed_cells(p.input, p.output, header), False))
        if not last:
            prompt_end += out.size
    if with_answer:
        parts.append(np.array([EOS]))
        target.append(np.zeros(1, bool))
        answer.append(np.zeros(1, bool))
        changed.append(np.zeros(1, bool))
    return Encoded(np.concatenate(parts).astype(np.int64), np.concatenate(target), np.concatenate(answer), prompt_end,
                   np.concatenate(changed))


def encode_prompt(demos: Seq[Pair], query_input: np.ndarray, *, header: bool = False) -> Encoded:
    """The prompt for one test input: demonstrations, then ``IN query OUT``."""
    return encode([*demos, Pair(query_input, None)], with_answer=False, header=header)


def sequence_length(pairs: Seq[Pair], *, with_answer: bool = True, header: bool = False) -> int:
    """Length of :func:`encode` without building it."""
    n = 1 + (1 if with_answer else 0)
    for i, p in enumerate(pairs):
        n += grid_length(p.input.shape, header) + 2
        if with_answer or i < len(pairs) - 1:
            n += grid_length(p.output.shape, header) + 1
    return n


def decode_answer(tokens: Seq[int] | np.ndarray, *, header: bool = False) -> np.ndarray:
    """Generated tokens (after the prompt's OUT) up to the first END -> grid; raises if malformed. With
    ``header`` the answer starts with ``#h #w``, which must agree with the grid."""
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    ends = np.flatnonzero(toks == END)
    if ends.size == 0:
        raise GridDecodeError("answer has no closing <end>")
    toks = toks[: ends[0]]
    if not header:
        return tokens_to_grid(toks)
    if toks.size < 2 or not ((toks[:2] >= SIZE0) & (toks[:2] < N_TOKENS)).all():
        raise GridDecodeError("answer does not start with its size #h #w")
    grid = tokens_to_grid(toks[2:])
    if grid.shape != (toks[0] - SIZE0 + 1, toks[1] - SIZE0 + 1):
        raise GridDecodeError(f"header says {toks[0] - SIZE0 + 1}x{toks[1] - SIZE0 + 1}, grid is "
                              f"{grid.shape[0]}x{grid.shape[1]}")
    return grid


def render(tokens: Seq[int] | np.ndarray) -> str:
    """Human-readable token string (for debugging and golden tests)."""
    return " ".join(NAMES[t] if t < N_TOKENS else f"<{t}>" for t in np.asarray(tokens).tolist())
