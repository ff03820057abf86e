"""Small shared layers: RMSNorm and 1-D rotary position embedding (DESIGN §3.3), and the matmul dtype under
autocast. No training logic here.

RoPE rotates channel pairs ``(i, i + d/2)`` of Q and K by ``position * base^(-2i/d)``, so the score between a query
at position m and a key at position n depends on ``m - n`` only (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.arc import MAX_SIDE
from ..data.tokens import IN, N_COLOURS, OUT, PAD, ROW, SIZE0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype where autocast is on for its device, else its own."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rope(nn.Module):
    """cos/sin tables for positions ``0..max_len-1``, applied to ``(B, T, H, d)`` tensors."""

    def __init__(self, head_dim: int, base: float = 10000.0, max_len: int = 16384):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.max_len = max_len
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]  # (max_len, d/2)
        # Non-persistent: rebuilt from the config, never saved in checkpoints.
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def prefix(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions ``0..n-1``: (n, d/2) each."""
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds model.max_positions={self.max_len}")
        return self.cos[:n], self.sin[:n]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for integer ``positions`` (B, T) -> (B, T, d/2) each (callers keep positions < max_len)."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, H, d) with tables (T, d/2) or (B, T, d/2)."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    # rotate in (at least) fp32 even under bf16 autocast: long positions need the angles' precision
    dt = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    cos, sin = cos.to(dt), sin.to(dt)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


N_COORDS = {"off": 0, "origin": 2, "borders": 4, "next": 8}  # coordinates per token of each model.grid_coords


def grid_coords(tokens: torch.Tensor, with_next: bool = False) -> torch.Tensor:
    """Each token's place in its grid: (..., T) tokens -> (..., T, 4) int64 ``(row, col, row_up, col_left)``;
    ``with_next`` (``model.grid_coords=next``): (..., T, 8), then the same four of the token the format puts next
    (:func:`next_coords`).

    ``row`` and ``col`` count from the top-left cell, from 1; ``row_up`` and ``col_left`` count from the bottom and
    right borders (``h + 1 - row``, ``w + 1 - col``), known only where the grid opens with its size header
    (``model.size_header``), else 0. Tokens outside grids (specials, the header) get 0 everywhere. A grid starts
    after an ``IN`` or ``OUT`` token; a row separator takes the row it closes, the column after that row's last
    cell and no ``col_left``. Read from the token stream alone, so training, prefill and decoding agree (the
    decoding form is :class:`GridCursor`)."""
    T = tokens.shape[-1]
    pos = torch.arange(T, device=tokens.device).expand_as(tokens)
    is_cell, is_row = tokens < N_COLOURS, tokens == ROW
    zero = torch.zeros_like(pos)
    start = torch.where((tokens == IN) | (tokens == OUT), pos, zero - 1).cummax(-1).values  # marker; -1: none
    # rows: the ROW tokens before t, minus those before the grid's start marker
    rows_before = is_row.long().cumsum(-1) - is_row.long()
    row = rows_before - rows_before.gather(-1, start.clamp(min=0))
    # columns: cells since the last token before t that is not a cell
    last_noncell = torch.where(is_cell, zero - 1, pos).cummax(-1).values  # -1: none yet
    col = pos - torch.cat([zero[..., :1] - 1, last_noncell[..., :-1]], -1) - 1
    # the grid's size, from the two tokens after its marker when they are size tokens (causal: never read ahead)
    h, w = (torch.where((start >= 0) & (pos >= start + k), _size_at(tokens, (start + k).clamp(0, T - 1)), zero)
            for k in (1, 2))
    inside = is_cell | is_row
    here = torch.stack([torch.where(inside, row + 1, zero), torch.where(inside, col + 1, zero),
                        torch.where(inside & (h > 0), h - row, zero),
                        torch.where(is_cell & (w > 0), w - col, zero)], -1)
    if not with_next:
        return here
    is_width = (start >= 0) & (pos == start + 2) & (w > 0)
    return torch.cat([here, next_coords(here[..., 0], here[..., 1], h, w, is_cell, is_row, is_width)], -1)


def next_coords(row: torch.Tensor, col: torch.Tensor, h: torch.Tensor, w: torch.Tensor, is_cell: torch.Tensor,
                is_row: torch.Tensor, is_width: torch.Tensor) -> torch.Tensor:
    """The coordinates ``(row, col, row_up, col_left)`` of the token that the grid format puts after each token,
    where the size header fixes it: after the width token the first cell; after a cell the next cell, or the row
    separator after a row's last cell; after a separator the next row's first cell; 0 everywhere else (after a
    grid's last cell, outside grids, without a header, or in a stream that breaks the format). A token at t
    predicts token t + 1: these say *which cell it is writing*, so a query can name the input cell it needs (the
    mirror of the cell being written, say) without first working out where a row wraps.

    ``row``, ``col``: the token's own 1-based coordinates (0 outside grids); ``h``, ``w``: its grid's size (0:
    unknown); ``is_width``: the token is its grid's width token (of a complete header)."""
    zero = torch.zeros_like(row)
    known = (h > 0) & (w > 0)
    in_row = known & is_cell & (col < w) & (row <= h)  # another cell of this row follows
    row_end = known & is_cell & (col == w) & (row < h)  # a separator follows
    row_next = known & is_row & (row < h)  # the next row's first cell follows
    first = known & is_width  # the grid's first cell follows
    n_row = torch.where(in_row | row_end, row, torch.where(row_next, row + 1, torch.where(first, 1, zero)))
    n_col = torch.where(in_row, col + 1, torch.where(row_end, w + 1, torch.where(row_next | first, 1, zero)))
    cell_next = in_row | row_next | first
    return torch.stack([n_row, n_col, torch.where(n_row > 0, h + 1 - n_row, zero),
                        torch.where(cell_next, w + 1 - n_col, zero)], -1)


MAX_PAIR = 15  # pairs further back than this from the query share one embedding
PAIR_ANSWER = 2  # :func:`pair_ids` of the query's output grid, hence of every token decoding writes


def pair_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Each token's pair and side (``model.pair_embed``): (..., T) -> (..., T) int64
    ``1 + 2 * min(pairs back from the query, MAX_PAIR) + (1 inside an output grid, 0 an input)``; 0 before the first
    ``IN``. The query's pair is 0 back, the last demonstration 1, and so on, counted over the whole prompt (which the
    model always sees whole before it answers); the answer the model writes is :data:`PAIR_ANSWER`. With it, "the
    same cell of the same pair" (a demonstration's input under its output, the test input under the answer) is a
    content match instead of a count of separators and grids."""
    T = tokens.shape[-1]
    pos = torch.arange(T, device=tokens.device).expand_as(tokens)
    is_in = tokens == IN
    seen = is_in.long().cumsum(-1)
    back = (seen[..., -1:] - seen).clamp(max=MAX_PAIR)
    last_in = torch.where(is_in, pos, torch.zeros_like(pos) - 1).cummax(-1).values
    last_out = torch.where(tokens == OUT, pos, torch.zeros_like(pos) - 1).cummax(-1).values
    return torch.where(seen > 0, 1 + 2 * back + (last_out > last_in).long(), torch.zeros_like(pos))


# The symmetries of the square (model.dihedral_cells), each as the input cell it reads for output cell (r, c) of
# an input of h x w; the first four keep the input's shape, the last four swap its sides.
DIHEDRAL = ("identity", "flip_lr", "flip_ud", "rot180", "transpose", "rot90cw", "rot90ccw", "antitranspose")
N_SOURCES = 2 * len(DIHEDRAL)  # per token: its own cell's source under each symmetry, then the next cell's
N_SOURCE_VALUES = 11  # a source: none (0) or colour + 1
DIHEDRAL_ROWS = N_SOURCES * N_SOURCE_VALUES + 3 * len(DIHEDRAL)  # the embedding rows: sources, agreement


def dihedral_source(r: torch.Tensor, c: torch.Tensor, h_in: torch.Tensor, w_in: torch.Tensor, h_out: torch.Tensor,
                    w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For output cells ``(r, c)`` (0-based) of an ``h_out x w_out`` grid whose pair's input is ``h_in x w_in``:
    the input cell ``(sr, sc)`` that each symmetry of :data:`DIHEDRAL` maps onto it, and whether that symmetry
    applies there (both sizes known, the output of the shape the symmetry gives the input, ``(r, c)`` inside it).
    All inputs broadcast; outputs (..., 8)."""
    r, c, h, w = torch.broadcast_tensors(r[..., None], c[..., None], h_in[..., None], w_in[..., None])
    sr = torch.cat([r, r, h - 1 - r, h - 1 - r, c, h - 1 - c, c, h - 1 - c], -1)
    sc = torch.cat([c, w - 1 - c, c, w - 1 - c, r, r, w - 1 - r, w - 1 - r], -1)
    same = (h_out == h_in) & (w_out == w_in)
    swap = (h_out == w_in) & (w_out == h_in)
    inside = (h_in > 0) & (w_in > 0) & (r[..., 0] >= 0) & (c[..., 0] >= 0) & (r[..., 0] < h_out) & (c[..., 0] < w_out)
    same, swap = same & inside, swap & inside
    ok = torch.cat([same[..., None].expand(*same.shape, 4), swap[..., None].expand(*swap.shape, 4)], -1)
    return sr, sc, ok


def _cell_at(marker: torch.Tensor, w: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The stream position of cell ``(r, c)`` (0-based) of the ``w``-wide grid whose ``IN``/``OUT`` marker is at
    ``marker``: after the marker and the 2 header tokens, rows of ``w`` cells and a separator."""
    return marker + 3 + r * (w + 1) + c


def dihedral_sources(tokens: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
    """What each token of an output grid can read off its pair's input (``model.dihedral_cells``): (..., T) ->
    (..., T, 16) int64, for each symmetry of :data:`DIHEDRAL` the colour (+ 1) of the input cell it maps onto the
    token's own cell, then onto the cell the token predicts (the next one, :func:`next_coords`); 0 where there is
    none (outside an output grid, an output of a shape the symmetry cannot give, a separator). The pair's input is
    the grid after the last ``IN``; sizes come from the size headers (``model.size_header``). With these, "the
    output is the input mirrored" is a question of which source a cell agrees with, asked of every cell of every
    demonstration, and writing the answer is reading the chosen source. Causal: a token only reads earlier ones.
    ``coords``: the tokens' ``grid_coords(tokens, with_next=True)`` where the caller has them already."""
    T = tokens.shape[-1]
    pos = torch.arange(T, device=tokens.device).expand_as(tokens)
    if coords is None:
        coords = grid_coords(tokens, with_next=True)
    none = torch.zeros_like(pos) - 1
    last_in = torch.where(tokens == IN, pos, none).cummax(-1).values
    last_out = torch.where(tokens == OUT, pos, none).cummax(-1).values
    in_output = (last_in >= 0) & (last_out > last_in)
    h_in, w_in = (torch.where(last_in >= 0, _size_at(tokens, (last_in + k).clamp(0, T - 1)), 0) for k in (1, 2))
    h_out, w_out = (torch.where(in_output & (pos >= last_out + k), _size_at(tokens, (last_out + k).clamp(0, T - 1)), 0)
                    for k in (1, 2))
    out = []
    for row, col, cell in ((coords[..., 0], coords[..., 1], tokens < N_COLOURS),
                           (coords[..., 4], coords[..., 5], coords[..., 4] > 0)):
        sr, sc, ok = dihedral_source(row - 1, col - 1, h_in, w_in, h_out, w_out)
        idx = _cell_at(last_in[..., None], w_in[..., None], sr, sc)
        colour = tokens.gather(-1, idx.clamp(0, T - 1).flatten(-2)).view(idx.shape)
        good = ok & (in_output & cell)[..., None] & (idx < pos[..., None]) & (colour < N_COLOURS)
        out.append(torch.where(good, colour + 1, 0))
    return torch.cat(out, -1)


def _size_at(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The side that the size token at ``idx`` names (1..30), or 0 where ``idx`` holds no size token."""
    t = tokens.gather(-1, idx)
    return torch.where((t >= SIZE0) & (t < SIZE0 + MAX_SIDE), t - SIZE0 + 1, torch.zeros_like(t))


class GridCursor:
    """:func:`grid_coords` one token at a time, for KV-cached decoding. Per sample: the ROW tokens since the grid
    started, the cells since the last non-cell token, the tokens since the grid's marker (up to 2) and the size
    read from its header; with ``sources`` (``model.dihedral_cells``), also the prompt's last input grid, which
    every decoded cell is read against (:func:`dihedral_sources`, equal to it while decoding writes the prompt's
    last output grid, as generation does)."""

    def __init__(self, tokens_BT: torch.Tensor, length_B: torch.Tensor, with_next: bool = False,
                 sources: bool = False):
        """State after each row's first ``length_B`` tokens (the prompt), read off a cell appended there;
        ``with_next``: :meth:`step` also gives the next token's coordinates (``model.grid_coords=next``);
        ``sources``: :meth:`step_sources` gives :func:`dihedral_sources` too."""
        self.with_next, self.sources = with_next, sources
        B = tokens_BT.shape[0]
        probe = torch.cat([tokens_BT, torch.zeros_like(tokens_BT[:, :1])], 1)
        idx = torch.arange(B, device=tokens_BT.device)
        probe[idx, length_B] = 0  # a cell right after each prompt: its coordinates are the state plus one
        c = grid_coords(probe)[idx, length_B]
        self.rows, self.cols = c[:, 0] - 1, c[:, 1] - 1
        pos = torch.arange(probe.shape[1], device=probe.device).expand_as(probe)
        none = torch.zeros_like(pos) - 1
        marker = torch.where((probe == IN) | (probe == OUT), pos, none).cummax(-1).values
        start = marker[idx, length_B]
        # tokens of this grid so far (its header's are the first two); 2 also when no grid has started
        self.since = torch.where(start >= 0, length_B - start - 1, torch.full_like(start, 2)).clamp(max=2)
        self.h = _size_at(probe, (start + 1).clamp(0, probe.shape[1] - 1)[:, None])[:, 0]
        self.w = _size_at(probe, (start + 2).clamp(0, probe.shape[1] - 1)[:, None])[:, 0]
        self.h = torch.where((start >= 0) & (self.since >= 1), self.h, torch.zeros_like(self.h))
        self.w = torch.where((start >= 0) & (self.since >= 2), self.w, torch.zeros_like(self.w))
        if sources:
            # the last input grid before each prompt's end, as (B, 30 x 30) colours (PAD outside it)
            last_in = torch.where(probe == IN, pos, none).cummax(-1).values[idx, length_B]
            sizes = [_size_at(probe, (last_in + k).clamp(0, probe.shape[1] - 1)[:, None])[:, 0] for k in (1, 2)]
            self.h_in, self.w_in = (torch.where(last_in >= 0, n, 0) for n in sizes)
            r = torch.arange(MAX_SIDE, device=probe.device)
            at = _cell_at(last_in[:, None, None], self.w_in[:, None, None], r[None, :, None], r[None, None, :])
            inside = (r[None, :, None] < self.h_in[:, None, None]) & (r[None, None, :] < self.w_in[:, None, None])
            inside &= at < length_B[:, None, None]
            cells = probe.gather(1, at.clamp(0, probe.shape[1] - 1).flatten(1)).view_as(at)
            grid = torch.where(inside, cells, PAD).flatten(1)
            # each symmetry's image of it, in an output of that image's shape: (B, 8, 30 x 30) sources (0: none)
            rows, cols = r.repeat_interleave(MAX_SIDE)[None], r.repeat(MAX_SIDE)[None]
            images = []
            for h_out, w_out, maps in ((self.h_in, self.w_in, slice(0, 4)), (self.w_in, self.h_in, slice(4, 8))):
                sr, sc, ok = dihedral_source(rows, cols, self.h_in[:, None], self.w_in[:, None], h_out[:, None],
                                             w_out[:, None])
                colour = grid.gather(1, (sr.clamp(0, MAX_SIDE - 1) * MAX_SIDE + sc.clamp(0, MAX_SIDE - 1)).flatten(1))
                colour = colour.view_as(sr)
                images.append(torch.where(ok & (colour < N_COLOURS), colour + 1, 0)[..., maps])
            self.images = torch.cat(images, -1).transpose(1, 2).contiguous()
            self.in_output = (start >= 0) & (last_in >= 0) & (probe[idx, start.clamp(min=0)] == OUT)

    def step(self, token_B: torch.Tensor) -> torch.Tensor:
        """Coordinates (B, 4) of ``token_B`` (B,) given everything before it (B, 8 ``with_next``); advances the
        state."""
        return self.step_sources(token_B)[0]

    def step_sources(self, token_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`step`, and the token's :func:`dihedral_sources` (B, 16) where the cursor has ``sources``."""
        is_cell, is_row = token_B < N_COLOURS, token_B == ROW
        is_size = (token_B >= SIZE0) & (token_B < SIZE0 + MAX_SIDE)
        inside = is_cell | is_row
        zero = torch.zeros_like(self.rows)
        start = (token_B == IN) | (token_B == OUT)
        # the size header: the two tokens right after the marker, when they are size tokens
        self.h = torch.where((self.since == 0) & is_size, token_B - SIZE0 + 1, self.h)
        self.w = torch.where((self.since == 1) & is_size, token_B - SIZE0 + 1, self.w)
        out = torch.stack([torch.where(inside, self.rows + 1, zero), torch.where(inside, self.cols + 1, zero),
                           torch.where(inside & (self.h > 0), self.h - self.rows, zero),
                           torch.where(is_cell & (self.w > 0), self.w - self.cols, zero)], -1)
        nxt = None
        if self.with_next or self.sources:
            is_width = (self.since == 1) & is_size & (self.w > 0)
            nxt = next_coords(out[:, 0], out[:, 1], self.h, self.w, is_cell, is_row, is_width)
        sources = None
        if self.sources:
            # the own cell and the next one read off the images: valid inside the output, where the output has
            # the shape of the symmetry's image
            row, col = torch.stack([out[:, 0], nxt[:, 0]], 1), torch.stack([out[:, 1], nxt[:, 1]], 1)  # (B, 2)
            here = torch.stack([is_cell, nxt[:, 0] > 0], 1) & self.in_output[:, None]
            here &= (row >= 1) & (col >= 1) & (row <= self.h[:, None]) & (col <= self.w[:, None])
            at = ((row - 1).clamp(0, MAX_SIDE - 1) * MAX_SIDE + (col - 1).clamp(0, MAX_SIDE - 1))
            found = self.images.gather(2, at[:, None, :].expand(-1, len(DIHEDRAL), -1))  # (B, 8, 2)
            fits = self.h_in > 0
            same = fits & (self.h == self.h_in) & (self.w == self.w_in)
            swap = fits & (self.h == self.w_in) & (self.w == self.h_in)
            shape_ok = torch.stack([same] * 4 + [swap] * 4, 1)  # (B, 8)
            sources = torch.where(here[:, None, :] & shape_ok[:, :, None], found, 0).transpose(1, 2).flatten(1)
            # a new input grid (never written by generation) is not the stored one: no sources after it
            self.h_in = torch.where(token_B == IN, 0, self.h_in)
            self.in_output = torch.where(start, (token_B == OUT) & (self.h_in > 0), self.in_output)
        if self.with_next:
            out = torch.cat([out, nxt], -1)
        self.rows = torch.where(start, zero, self.rows + is_row.long())
        self.cols = torch.where(is_cell, self.cols + 1, zero)
        self.since = torch.where(start, zero, (self.since + 1).clamp(max=2))
        self.h = torch.where(start, zero, self.h)
        self.w = torch.where(start, zero, self.w)
        return out, sources

    def keep(self, idx: torch.Tensor) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[idx])
