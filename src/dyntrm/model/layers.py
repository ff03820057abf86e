"""Small shared layers: RMSNorm and 1-D rotary position embedding (DESIGN §3.3), and the matmul dtype under
autocast. No training logic here.

RoPE rotates channel pairs ``(i, i + d/2)`` of Q and K by ``position * base^(-2i/d)``, so the score between a query
at position m and a key at position n depends on ``m - n`` only (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokens import IN, N_COLOURS, OUT, ROW


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


def grid_coords(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (row, column) inside its grid, counted from 1, and 0 outside grids (specials, size header).

    ``tokens`` (..., T) -> two (..., T) int64 tensors. A grid starts after an ``IN`` or ``OUT`` token; a row
    separator takes the row it closes and the column after that row's last cell. Read from the token stream alone,
    so training, prefill and decoding agree (the decoding form is :class:`GridCursor`)."""
    T = tokens.shape[-1]
    pos = torch.arange(T, device=tokens.device).expand_as(tokens)
    is_cell, is_row = tokens < N_COLOURS, tokens == ROW
    zero = torch.zeros_like(pos)
    # rows: the ROW tokens before t, minus those before the grid's start marker
    rows_before = is_row.long().cumsum(-1) - is_row.long()
    start = torch.where((tokens == IN) | (tokens == OUT), pos, zero).cummax(-1).values
    row = rows_before - rows_before.gather(-1, start)
    # columns: cells since the last token before t that is not a cell
    last_noncell = torch.where(is_cell, zero, pos).cummax(-1).values
    prev = torch.cat([zero[..., :1], last_noncell[..., :-1]], -1)
    col = pos - prev - 1
    inside = is_cell | is_row
    return torch.where(inside, row + 1, zero), torch.where(inside, col + 1, zero)


class GridCursor:
    """:func:`grid_coords` one token at a time, for KV-cached decoding: per sample, the ROW tokens since the grid
    started and the cells since the last non-cell token."""

    def __init__(self, tokens_BT: torch.Tensor, length_B: torch.Tensor):
        """State after each row's first ``length_B`` tokens (the prompt), read by appending one cell."""
        B = tokens_BT.shape[0]
        probe = torch.cat([tokens_BT, torch.zeros_like(tokens_BT[:, :1])], 1)
        idx = torch.arange(B, device=tokens_BT.device)
        probe[idx, length_B] = 0  # a cell right after each prompt: its coordinates are the state plus one
        row, col = grid_coords(probe)
        self.rows, self.cols = row[idx, length_B] - 1, col[idx, length_B] - 1

    def step(self, token_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates of ``token_B`` (B,) given everything before it; advances the state."""
        is_cell, is_row = token_B < N_COLOURS, token_B == ROW
        inside = is_cell | is_row
        zero = torch.zeros_like(self.rows)
        row, col = torch.where(inside, self.rows + 1, zero), torch.where(inside, self.cols + 1, zero)
        start = (token_B == IN) | (token_B == OUT)
        self.rows = torch.where(start, zero, self.rows + is_row.long())
        self.cols = torch.where(is_cell, self.cols + 1, zero)
        return row, col

    def keep(self, idx: torch.Tensor) -> None:
        self.rows, self.cols = self.rows[idx], self.cols[idx]
