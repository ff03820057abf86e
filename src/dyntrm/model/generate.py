"""Inference (DESIGN §3.6, §5): the recursion with halting, KV-cached decoding, grid-constrained generation.

Training runs every sample through all N steps (``ArcTransformer.forward``). Here each sample leaves the batch at
its halting step (``ArcTransformer.should_halt``, read at the prompt's end), so a halted sample costs nothing more::

    running = every row
    for s in range(N):
        x[running] = model.step(x[running], x0[running], s, ctx of those rows, KV cache of step s)
        running = the rows whose halting rule has not fired

Generation first runs the prompts this way (:func:`prefill`), keeping one KV cache per step for the rows that ran
it; then every new token (:func:`decode`) goes through the same steps for the same rows, reading and extending
those caches (on CUDA that step is captured once per batch layout and replayed as a CUDA graph,
:class:`DecodeGraph`). :func:`generate` decodes answers constrained to well-formed grids (:class:`GridConstraint`): only
colours, row separators and ``END``; every row as wide as the first; at most 30 x 30; under ``model.size_header``
exactly the shape of the two size tokens the model writes first. Nothing is sized from the target. Shapes: ``B`` batch, ``R`` rows still running, ``T`` time, ``D`` width, ``H`` heads, ``d`` head width,
``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..config import MAX_ANSWER_TOKENS
from ..data.arc import MAX_SIDE, N_COLOURS
from ..data.batching import padded
from ..data.tokens import END, PAD, ROW, SIZE0, GridDecodeError, decode_answer
from .context import AttnMask, ModelOutput, StepContext, Tap
from .layers import PAIR_ANSWER, GridCursor, compute_dtype


class KVCache:
    """Keys and values of one recursion step for a batch of sequences, preallocated to ``capacity``."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def fill(self, k_BTHd: torch.Tensor, v_BTHd: torch.Tensor) -> None:
        """Prefill: positions 0..T-1 of every row."""
        T = k_BTHd.shape[1]
        self.k[:, :, :T] = k_BTHd.transpose(1, 2)
        self.v[:, :, :T] = v_BTHd.transpose(1, 2)

    def write(self, k_B1Hd: torch.Tensor, v_B1Hd: torch.Tensor, pos_B: torch.Tensor) -> None:
        """Decode: one new key/value per row, each at its own position (a scatter: no host sync, capturable)."""
        B, _, H, d = k_B1Hd.shape
        idx = pos_B.view(B, 1, 1, 1).expand(B, H, 1, d)
        self.k.scatter_(2, idx, k_B1Hd.transpose(1, 2).to(self.k.dtype))
        self.v.scatter_(2, idx, v_B1Hd.transpose(1, 2).to(self.v.dtype))


@dataclass
class DecodeState:
    """KV-cached generation state: step s ran for the batch rows ``rows[s]`` and cached their keys/values."""

    rows: list[torch.Tensor]
    caches: list[KVCache]
    pos: torch.Tensor  # (B,) position the next token takes
    steps: torch.Tensor  # (B,) steps per sample, fixed at prefill
    q_halt: torch.Tensor  # (S, B) halting logits seen at prefill
    q_continue: torch.Tensor
    cursor: GridCursor | None = None  # each sample's place in its grid (model.grid_coords, model.dihedral_cells)

    def counter_slots(self) -> list[tuple[object, str]]:
        """Where the tensors live that every decoded token replaces (positions, the grid cursor's state), as
        (object, attribute) pairs: :class:`DecodeGraph` copies each step's new values back into the tensors its
        next replay reads."""
        slots: list[tuple[object, str]] = [(self, "pos")]
        if self.cursor is not None:
            slots += [(self.cursor, k) for k, v in vars(self.cursor).items() if isinstance(v, torch.Tensor)]
        return slots

    def counters(self) -> list[torch.Tensor]:
        return [getattr(o, k) for o, k in self.counter_slots()]

    def keep(self, idx: torch.Tensor) -> "DecodeState":
        """Only the batch rows ``idx`` go on, renumbered in that order: used to drop finished sequences from a
        decoding batch so that they stop costing compute. The caches shrink *in place*: the old state is spent."""
        B = self.pos.shape[0]
        new_index = torch.full((B,), -1, dtype=torch.long, device=idx.device)
        new_index[idx] = torch.arange(idx.numel(), device=idx.device)
        rows, caches = [], []
        for r, c in zip(self.rows, self.caches):
            sel = torch.nonzero(new_index[r] >= 0, as_tuple=True)[0]
            c.k, c.v = c.k[sel], c.v[sel]
            rows.append(new_index[r[sel]])
            caches.append(c)
        if self.cursor is not None:
            self.cursor.keep(idx)
        return DecodeState(rows, caches, self.pos[idx], self.steps[idx], self.q_halt[:, idx], self.q_continue[:, idx],
                           self.cursor)


# ------------------------------------------------------------------------------------------------ the recursion

def recur_until_halted(model: nn.Module, tokens_BT: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       prompt_end: torch.Tensor | None = None, *, tap: Tap | None = None,
                       steps_B: torch.Tensor | None = None, cache_capacity: int | None = None
                       ) -> tuple[ModelOutput, list[torch.Tensor], list[KVCache]]:
    """``model(tokens, ..., halt=True)``: the recursion of an ``ArcTransformer`` in which each sample stops at its
    halting step, or after ``steps_B`` (B,) steps when given. A halted sample's logits and halting logits repeat
    its last step's from then on.

    With ``cache_capacity``, step s keeps a KV cache of that many positions for the rows that ran it: returned as
    ``rows[s]`` and ``caches[s]`` (empty lists otherwise).
    """
    B = tokens_BT.shape[0]
    ctx, prompt_end_B, n_real = model.context(tokens_BT, attention_mask, prompt_end, tap)
    x0_BTD = model.embed_tokens(tokens_BT)
    x_BTD = x0_BTD
    every_B = torch.arange(B, device=tokens_BT.device)
    running = None  # the rows still recursing, (R,); None: all of them, which needs no gather (the first step)
    ran_B = torch.zeros(B, dtype=torch.long, device=tokens_BT.device)
    logits, q_halt, q_continue, step_rows, caches = [], [], [], [], []
    l1 = active = tokens_BT.new_zeros((), dtype=torch.float32)
    for s in range(model.cfg.max_steps):
        rows = slice(None) if running is None else running
        step_ctx = ctx if running is None else ctx.rows(running)
        if cache_capacity is not None:
            R = B if running is None else running.numel()
            # in the dtype keys and values are computed in (bf16 under autocast): attention reads them as they are
            cache = KVCache(R, model.cfg.n_heads, cache_capacity, model.cfg.d_head, x_BTD.device,
                            compute_dtype(x_BTD))
            step_rows.append(every_B if running is None else running)
            caches.append(cache)
            step_ctx = replace(step_ctx, cache=cache)
        x_RTD, stats, _ = model.step(x_BTD[rows], x0_BTD[rows], s, step_ctx)
        l1, active = l1 + stats.l1, active + stats.active
        qh_R, qc_R = model.block.halt_logits(x_RTD[torch.arange(x_RTD.shape[0], device=x_RTD.device),
                                                   prompt_end_B[rows]])
        logits_RTV = model.lm_head(model.norm(x_RTD))
        if running is None:
            x_BTD, logits_BTV, qh_B, qc_B = x_RTD, logits_RTV, qh_R, qc_R
        else:  # the halted rows keep their last values
            x_BTD = x_BTD.index_copy(0, running, x_RTD)
            logits_BTV = logits[-1].index_copy(0, running, logits_RTV)
            qh_B, qc_B = q_halt[-1].index_copy(0, running, qh_R), q_continue[-1].index_copy(0, running, qc_R)
        logits.append(logits_BTV)
        q_halt.append(qh_B)
        q_continue.append(qc_B)
        ran_B[rows] += 1
        idx = every_B if running is None else running
        stop_R = (ran_B[idx] >= steps_B[idx]) if steps_B is not None else model.should_halt(qh_R, qc_R, s)
        if bool(stop_R.all()):
            break
        running = idx[~stop_R]
    S = len(logits)
    out = ModelOutput(torch.stack(logits), torch.stack(q_halt), torch.stack(q_continue), ran_B,
                      l1 / (n_real * S), (active / (n_real * S)).detach())
    return out, step_rows, caches


@torch.no_grad()
def prefill(model: nn.Module, tokens_BT: torch.Tensor, prompt_len_B: torch.Tensor, max_new: int, *,
            steps_B: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
    """Run right-padded prompts (B, T) of lengths ``prompt_len_B``; decide each sample's steps (ACT, or the given
    ``steps_B``), keep one KV cache per step with room for ``max_new`` tokens. Returns the logits (B, V) of each
    prompt's last position (the first answer token) and the decoding state."""
    B, T = tokens_BT.shape
    mask_BT = torch.arange(T, device=tokens_BT.device)[None, :] < prompt_len_B[:, None]
    out, rows, caches = recur_until_halted(model, tokens_BT, mask_BT, prompt_len_B - 1, steps_B=steps_B,
                                           cache_capacity=T + max_new)
    last_BV = out.final_logits[torch.arange(B, device=tokens_BT.device), prompt_len_B - 1]
    cfg = model.cfg
    cursor = (GridCursor(tokens_BT, prompt_len_B, with_next=cfg.grid_coords == "next", sources=cfg.dihedral_cells)
              if cfg.grid_coords != "off" or cfg.dihedral_cells else None)
    return last_BV, DecodeState(rows, caches, prompt_len_B.clone(), out.steps, out.q_halt, out.q_continue, cursor)


@torch.no_grad()
def decode(model: nn.Module, token_B: torch.Tensor, state: DecodeState, tap: Tap | None = None, *,
           static: bool = False) -> torch.Tensor:
    """Feed one token per sample (B,) at its own position through the steps chosen at prefill; returns the
    next-token logits (B, V). The state advances (positions, grid cursor, KV caches).

    ``static``: no host sync and no shape that depends on values (attention reads the whole cache under its mask,
    the experts run densely with the inactive ones weighing 0): what :class:`DecodeGraph` captures. Same values.
    """
    coords_B1K = sources_B1K = None
    if state.cursor is not None:
        coords_BK, sources_BK = state.cursor.step_sources(token_B)
        coords_B1K, sources_B1K = coords_BK[:, None], None if sources_BK is None else sources_BK[:, None]
    # model.pair_embed: every written token is in the query's output grid
    pairs_B1 = None if model.pair_embed is None else torch.full_like(token_B[:, None], PAIR_ANSWER)
    x0_B1D = model.embed_tokens(token_B[:, None], coords_B1K, pairs_B1, sources_B1K)
    x_B1D = x0_B1D
    pos_B = state.pos
    if static:  # DecodeGraph checks the capacity once, ahead of all its replays
        length = state.caches[0].k.shape[2]
    else:
        length = int(pos_B.max()) + 1  # one host sync per token: attention then reads only the keys in use
        if length > state.caches[0].k.shape[2]:
            raise ValueError("decode ran past the KV cache capacity chosen at prefill (max_new)")
    keys_L = torch.arange(length, device=pos_B.device)
    for s, (rows_R, cache) in enumerate(zip(state.rows, state.caches)):
        if rows_R.numel() == 0:  # every sample that needed this step has left the batch
            break
        pos_R = pos_B[rows_R]
        cos, sin = model.rope.at(pos_R[:, None])
        mask = AttnMask(False, (keys_L[None, :] <= pos_R[:, None])[:, None, None, :])  # (R, 1, 1, L)
        ctx = StepContext(s, cos, sin, mask, cache=cache, decode_pos=pos_R, observer=tap, static=static)
        x_R1D, _, _ = model.step(x_B1D[rows_R], x0_B1D[rows_R], s, ctx)
        x_B1D = x_B1D.index_copy(0, rows_R, x_R1D)
    state.pos = pos_B + 1
    return model.lm_head(model.norm(x_B1D[:, 0]))


class DecodeGraph:
    """:func:`decode` (static) captured as one CUDA graph for one layout of a :class:`DecodeState` (its batch rows,
    the rows of every step, the cache capacity) and replayed for every token: one launch instead of hundreds of
    small kernels per token, which is what bounds batched decoding on a GPU. Each replay advances the state as
    :func:`decode` does (the graph ends by copying the new positions and cursor into the tensors it reads); after
    ``DecodeState.keep`` (a new layout) build a new graph.
    """

    def __init__(self, model: nn.Module, state: DecodeState):
        if state.pos.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.state = state
        self.room = state.caches[0].k.shape[2] - int(state.pos.max())  # tokens that still fit the caches
        self.token = torch.zeros_like(state.pos)
        slots = state.counter_slots()
        inputs = state.counters()
        saved = [t.clone() for t in inputs]

        def put_back() -> None:  # the counters' tensors and values as before the call
            for (obj, name), t in zip(slots, inputs):
                setattr(obj, name, t)

        # Warm-up on a side stream (required before a capture: lazy initialisations, Triton compilations). Its
        # keys and values land at the positions the first replay overwrites; the counters are put back.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            decode(model, self.token, state, static=True)
        torch.cuda.current_stream().wait_stream(side)
        put_back()
        for t, v in zip(inputs, saved):
            t.copy_(v)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():  # records, runs nothing
            self.logits = decode(model, self.token, state, static=True)
            for t, new in zip(inputs, state.counters()):
                t.copy_(new)
        put_back()

    def __call__(self, token_B: torch.Tensor) -> torch.Tensor:
        """:func:`decode` of ``token_B`` (B,): the next-token logits (B, V)."""
        if self.room <= 0:
            raise ValueError("decode ran past the KV cache capacity chosen at prefill (max_new)")
        self.room -= 1
        self.token.copy_(token_B)
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay


# ------------------------------------------------------------------------------------------------ grids

class GridConstraint:
    """Per-sample state machine over generated tokens that only allows well-formed grids (vectorised).

    With ``header`` (``model.size_header``) an answer is ``#h #w`` then exactly h rows of w cells: the model
    chooses the two size tokens (at most ``max_side`` each); every row separator and the closing ``END`` are then
    the only tokens allowed where they fall, so no answer of another shape can be written. ``sizes`` (B, 2) fixes
    a sample's header to (h, w) where given (0: the model chooses)."""

    def __init__(self, batch: int, vocab: int, device: torch.device, max_side: torch.Tensor | None = None,
                 header: bool = False, sizes: torch.Tensor | None = None):
        self.vocab, self.header = vocab, header
        if sizes is not None and not header:
            raise ValueError("sizes fix the size header: they need model.size_header")
        self.sizes = None if sizes is None else sizes.to(device=device, dtype=torch.long).clamp(0, MAX_SIDE)
        # per-sample limit on rows and columns (default 30)
        self.max_side = torch.full((batch,), MAX_SIDE, dtype=torch.long, device=device) if max_side is None \
            else max_side.to(device).clamp(1, MAX_SIDE)
        self.row_w = torch.zeros(batch, dtype=torch.long, device=device)  # cells in the current row
        self.first_w = torch.zeros(batch, dtype=torch.long, device=device)  # width of row 0 (0: row 0 still open)
        self.rows = torch.ones(batch, dtype=torch.long, device=device)  # rows started
        self.height = torch.zeros(batch, dtype=torch.long, device=device)  # header: rows chosen (0: not yet)
        self.n_header = torch.zeros(batch, dtype=torch.long, device=device)  # header tokens written (0..2)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    STATE = ("row_w", "first_w", "rows", "height", "n_header", "done", "max_side", "sizes")

    def keep(self, idx: torch.Tensor) -> None:
        """Only the samples ``idx`` go on (finished ones leave the decoding batch)."""
        for name in self.STATE:
            if getattr(self, name) is not None:  # sizes: None unless given
                setattr(self, name, getattr(self, name)[idx])

    def allowed(self) -> torch.Tensor:
        """(B, V) bool: what each sample may emit next."""
        B = self.done.shape[0]
        in_header = ~self.done & (self.n_header < 2) if self.header else torch.zeros_like(self.done)
        in_grid = ~self.done & ~in_header
        width_cap = torch.where(self.first_w > 0, self.first_w, self.max_side)
        row_full = (self.first_w == 0) | (self.row_w == self.first_w)
        colour = in_grid & (self.row_w < width_cap)
        close_row = in_grid & (self.row_w > 0) & row_full
        mask = torch.zeros(B, self.vocab, dtype=torch.bool, device=self.done.device)
        mask[:, :N_COLOURS] = colour[:, None]
        if self.header:
            sides = torch.arange(1, MAX_SIDE + 1, device=self.done.device)
            mask[:, SIZE0:SIZE0 + MAX_SIDE] = in_header[:, None] & (sides[None, :] <= self.max_side[:, None])
            if self.sizes is not None:  # a pinned side is the only one allowed, even past max_side
                fixed = self.sizes.gather(1, self.n_header.clamp(max=1)[:, None])[:, 0]  # this header token's, or 0
                pinned = (in_header & (fixed > 0))[:, None]
                mask[:, SIZE0:SIZE0 + MAX_SIDE] = torch.where(pinned, sides[None, :] == fixed[:, None],
                                                              mask[:, SIZE0:SIZE0 + MAX_SIDE])
            mask[:, ROW] = close_row & (self.rows < self.height)
            mask[:, END] = close_row & (self.rows == self.height)
        else:
            mask[:, ROW] = close_row & (self.rows < self.max_side)
            mask[:, END] = close_row
        mask[:, PAD] = self.done  # finished samples idle on padding
        return mask

    def update(self, tok: torch.Tensor) -> None:
        if self.header:  # #h, then #w: the width is known before the first cell
            size = tok - SIZE0 + 1
            first, second = ~self.done & (self.n_header == 0), ~self.done & (self.n_header == 1)
            self.height = torch.where(first, size, self.height)
            self.first_w = torch.where(second, size, self.first_w)
            self.n_header = self.n_header + (first | second).long()
            tok = torch.where(first | second, torch.full_like(tok, PAD), tok)  # not a cell or separator
        is_colour = tok < N_COLOURS
        is_row = (tok == ROW) & ~self.done
        self.row_w = torch.where(is_colour & ~self.done, self.row_w + 1, self.row_w)
        self.first_w = torch.where(is_row & (self.first_w == 0), self.row_w, self.first_w)
        self.rows = self.rows + is_row.long()
        self.row_w = torch.where(is_row, torch.zeros_like(self.row_w), self.row_w)
        self.done = self.done | (tok == END)


@dataclass
class Generation:
    tokens: list[int]  # generated tokens up to and including END (when reached)
    grid: np.ndarray | None  # None when the tokens are not a well-formed grid (unconstrained decoding only)
    logprob: float  # sum of token log-probabilities (under the constrained distribution when constrained)
    steps: int  # recursion steps used (ACT)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(len(self.tokens), 1)


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[np.ndarray], *, max_new: int = MAX_ANSWER_TOKENS,
             constrain: bool = True, temperature: float = 0.0, top_k: int = 0, steps: torch.Tensor | None = None,
             generator: torch.Generator | None = None, compact: float = 0.5,
             max_sides: Sequence[int] | None = None, cuda_graphs: bool | None = None,
             sizes: Sequence[tuple[int, int]] | None = None) -> list[Generation]:
    """Decode one answer per prompt (token arrays ending with the query's OUT), as one batch.

    Greedy by default; ``temperature > 0`` samples (optionally from the ``top_k`` most likely tokens). Samples that
    finish leave the batch once the finished fraction exceeds ``compact``. ``max_sides`` optionally limits each
    answer's rows and columns (default 30); ``sizes`` fixes each answer's (height, width) under the size header
    (0: the model chooses), the rest of the answer decoded as usual. ``cuda_graphs`` (default: on CUDA) replays each
    token's decoding step as a CUDA graph (:class:`DecodeGraph`), captured again whenever finished samples leave the
    batch.
    """
    device = next(model.parameters()).device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    graph = None
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lengths.max())
    if T + max_new > model.cfg.max_positions:  # evaluate_items skips such prompts; a direct call is a mistake
        raise ValueError(f"a prompt of {T} tokens plus {max_new} answer tokens exceeds model.max_positions="
                         f"{model.cfg.max_positions}")
    tokens = torch.full((B, T), PAD, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(p, device=device)
    logits, state = prefill(model, tokens, lengths, max_new, steps_B=steps)
    header = bool(model.cfg.size_header)
    con = GridConstraint(B, logits.shape[-1], device,
                         None if max_sides is None else torch.tensor(list(max_sides), dtype=torch.long), header,
                         None if sizes is None else torch.tensor([list(hw) for hw in sizes], dtype=torch.long))
    alive = torch.arange(B, device=device)  # original index of each row still in the batch
    out_tok = torch.full((B, max_new), PAD, dtype=torch.long, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    logprob = torch.zeros(B, dtype=torch.float64, device=device)
    steps_used = state.steps.clone()
    for t in range(max_new):
        lg = logits.float()
        if constrain:
            lg = lg.masked_fill(~con.allowed(), float("-inf"))
        else:
            lg[:, PAD] = float("-inf")
        logp = torch.log_softmax(lg, -1)
        if temperature > 0:
            z = lg / temperature
            if top_k > 0:
                kth = torch.topk(z, min(top_k, z.shape[-1]), -1).values[:, -1:]
                z = z.masked_fill(z < kth, float("-inf"))
            tok = torch.multinomial(torch.softmax(z, -1), 1, generator=generator)[:, 0]
        else:
            tok = lg.argmax(-1)
        tok = torch.where(con.done, torch.full_like(tok, PAD), tok)
        live = ~con.done
        logprob[alive[live]] += logp[live].gather(1, tok[live, None])[:, 0].double()
        out_tok[alive[live], n_out[alive[live]]] = tok[live]
        n_out[alive[live]] += 1
        con.update(tok)
        if not constrain:  # unconstrained: stop at END or when a row runs past the limits
            con.done |= (con.rows > MAX_SIDE) | (con.row_w > MAX_SIDE)
        if bool(con.done.all()):
            break
        if t + 1 == max_new:
            break
        if float(con.done.float().mean()) > compact:
            keep = torch.nonzero(~con.done, as_tuple=True)[0]
            state = state.keep(keep)
            alive, tok = alive[keep], tok[keep]
            con.keep(keep)
            graph = None  # a new layout
        if cuda_graphs:
            graph = graph or DecodeGraph(model, state)
            logits = graph(tok)
        else:
            logits = decode(model, tok, state)
    results = []
    for i in range(B):
        toks = out_tok[i, :n_out[i]].tolist()
        try:
            grid = decode_answer(toks, header=header) if toks and toks[-1] == END else None
        except GridDecodeError:
            grid = None
        results.append(Generation(toks, grid, float(logprob[i]), int(steps_used[i])))
    return results


def generate_batched(model: nn.Module, prompts: Sequence[np.ndarray], *, tokens_per_batch: int = 131072, **kw
                     ) -> list[Generation]:
    """:func:`generate` over prompts grouped by length into batches of about ``tokens_per_batch`` prompt +
    answer-capacity tokens. Results come back in the input order."""
    max_new = kw.get("max_new", MAX_ANSWER_TOKENS)
    sides = kw.pop("max_sides", None)  # per-prompt options follow their prompts into the batches
    steps = kw.pop("steps", None)
    sizes = kw.pop("sizes", None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * (padded(len(prompts[order[j]])) + max_new) <= tokens_per_batch:
            j += 1
        idx = order[i:j]
        part = None if sides is None else [sides[k] for k in idx]
        part_steps = None if steps is None else torch.as_tensor(steps)[idx]
        part_sizes = None if sizes is None else [sizes[k] for k in idx]
        for k, g in zip(idx, generate(model, [prompts[k] for k in idx], max_sides=part, steps=part_steps,
                                      sizes=part_sizes, **kw)):
            results[k] = g
        i = j
    return results  # type: ignore[return-value]


