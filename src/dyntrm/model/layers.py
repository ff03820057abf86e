"""Small shared layers: RMSNorm and 1-D rotary position embedding (DESIGN §3.3). No training logic here.

RoPE rotates channel pairs ``(i, i + d/2)`` of Q and K by ``position * base^(-2i/d)``, so the score between a query
at position m and a key at position n depends on ``m - n`` only (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

