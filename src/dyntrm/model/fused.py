"""The ``fused`` composition path of the expert library on CUDA (DESIGN §3.4): a Triton kernel for

    out[n, c] = Σ_e w[n, c, e] · silu(x[n] @ w1[e]) @ w2[e]        x (N, d_in), w (N, C, E), w1 (E, d_in, F),
                                                                    w2 (E, F, d_out) -> out (N, C, d_out)

Each program takes a block of rows and loops over the experts: ``a = x @ w1[e]``, ``o = silu(a) @ w2[e]`` and the
C accumulators ``acc_c += w[:, c, e] · o`` all live in registers, so the (N, E·F) hidden activations that the
other paths write to memory never exist, and the FLOPs are exactly the model's. The backward recomputes them, in
two kernels:

- over row blocks: ``dw[n, c, e] = <g[n, c], o_e[n]>`` and ``dx = Σ_e da_e @ w1[e]ᵀ`` with
  ``do_e = Σ_c w[:, c, e] · g_c``, ``da_e = (do_e @ w2[e]ᵀ) ⊙ silu'(a_e)``;
- over (expert, slice of row blocks): ``dw2[e] = Σ_n silu(a_e)ᵀ do_e`` and ``dw1[e] = Σ_n xᵀ da_e``, one partial
  sum per slice (fp32), added up in torch: enough programs to fill the GPU with no atomics.

Dots take the compute dtype (bf16 under autocast) and accumulate in fp32; fp32 inputs use IEEE fp32 dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set. Triton ships with torch's CUDA builds; without it (or without
CUDA) :func:`fits` is False and the library uses another path.
"""

from __future__ import annotations

import torch

from .layers import compute_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: the ``experts`` path is used
    triton = None

MAX_WIDTH = 128  # widest d_in, F or d_out the kernels take (registers: a (rows, F) block per expert)
MAX_CHANNELS = 3


def fits(d_in: int, hidden: int, d_out: int) -> bool:
    """Whether the fused kernels can run a library of these widths here (Triton, CUDA, widths <= MAX_WIDTH)."""
    return triton is not None and torch.cuda.is_available() and max(d_in, hidden, d_out) <= MAX_WIDTH


if triton is not None:

    # rows per program and warps, chosen per widths and dtypes on first use (seconds: each config compiles): at
    # 64-wide experts on an H200 one fixed choice (64 rows, 4 warps) ran the composition at 6.3% of the bf16
    # matmul rate (below the experts path's 7.7%), the tuned kernels at 8.0%
    _CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=2)
                for bn, nw in ((32, 4), (64, 4), (64, 8), (128, 8))]
    _KEY = ["E", "D_IN", "F", "D_OUT", "C"]

    @triton.jit
    def _silu_parts(a):
        """silu(a) and silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))), fp32."""
        sig = tl.sigmoid(a)
        return a * sig, sig * (1.0 + a * (1.0 - sig))

    @triton.jit
    def _load_rows(X, rows, N, D_IN, s_xn, BD_IN: tl.constexpr):
        """x of a block of rows, (BLOCK_N, BD_IN), zero past N rows and D_IN columns."""
        di = tl.arange(0, BD_IN)
        return tl.load(X + rows[:, None] * s_xn + di[None, :], mask=(rows < N)[:, None] & (di[None, :] < D_IN),
                       other=0.0)

    @triton.autotune(configs=_CONFIGS, key=_KEY)
    @triton.jit
    def _fwd_kernel(X, W, W1, W2, OUT, N, E, D_IN, F, D_OUT,
                    s_xn, s_wn, s_wc, s_we, s_w1e, s_w1d, s_w2e, s_w2f, s_on, s_oc,
                    C: tl.constexpr, BLOCK_N: tl.constexpr, BD_IN: tl.constexpr, BF: tl.constexpr,
                    BD_OUT: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        di, ff, do = tl.arange(0, BD_IN), tl.arange(0, BF), tl.arange(0, BD_OUT)
        x = _load_rows(X, rows, N, D_IN, s_xn, BD_IN)
        w1_mask = (di[:, None] < D_IN) & (ff[None, :] < F)
        w2_mask = (ff[:, None] < F) & (do[None, :] < D_OUT)
        acc0 = tl.zeros((BLOCK_N, BD_OUT), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BD_OUT), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BD_OUT), dtype=tl.float32)
        for e in range(E):
            w1 = tl.load(W1 + e * s_w1e + di[:, None] * s_w1d + ff[None, :], mask=w1_mask, other=0.0)
            s, _ = _silu_parts(tl.dot(x, w1, input_precision=PRECISION))
            w2 = tl.load(W2 + e * s_w2e + ff[:, None] * s_w2f + do[None, :], mask=w2_mask, other=0.0)
            o = tl.dot(s.to(w2.dtype), w2, input_precision=PRECISION)  # (BLOCK_N, BD_OUT) fp32
            wp = W + rows * s_wn + e * s_we
            acc0 += tl.load(wp, mask=rmask, other=0.0).to(tl.float32)[:, None] * o
            if C > 1:
                acc1 += tl.load(wp + s_wc, mask=rmask, other=0.0).to(tl.float32)[:, None] * o
            if C > 2:
                acc2 += tl.load(wp + 2 * s_wc, mask=rmask, other=0.0).to(tl.float32)[:, None] * o
        op = OUT + rows[:, None] * s_on + do[None, :]
        omask = rmask[:, None] & (do[None, :] < D_OUT)
        tl.store(op, acc0.to(OUT.dtype.element_ty), mask=omask)
        if C > 1:
            tl.store(op + s_oc, acc1.to(OUT.dtype.element_ty), mask=omask)
        if C > 2:
            tl.store(op + 2 * s_oc, acc2.to(OUT.dtype.element_ty), mask=omask)

    @triton.jit
    def _load_grads(G, rows, rmask, do, D_OUT, s_gn, s_gc, C: tl.constexpr, BLOCK_N: tl.constexpr,
                    BD_OUT: tl.constexpr):
        """The upstream gradients g[:, c] of a block of rows, fp32 (zeros for the channels past C)."""
        gp = G + rows[:, None] * s_gn + do[None, :]
        gmask = rmask[:, None] & (do[None, :] < D_OUT)
        g0 = tl.load(gp, mask=gmask, other=0.0).to(tl.float32)
        g1 = tl.zeros((BLOCK_N, BD_OUT), dtype=tl.float32)
        g2 = tl.zeros((BLOCK_N, BD_OUT), dtype=tl.float32)
        if C > 1:
            g1 = tl.load(gp + s_gc, mask=gmask, other=0.0).to(tl.float32)
        if C > 2:
            g2 = tl.load(gp + 2 * s_gc, mask=gmask, other=0.0).to(tl.float32)
        return g0, g1, g2

    @triton.jit
    def _expert_grad_out(W, rows, rmask, e, s_wn, s_wc, s_we, g0, g1, g2, C: tl.constexpr):
        """do_e = Σ_c w[:, c, e] · g_c, fp32 (BLOCK_N, BD_OUT)."""
        wp = W + rows * s_wn + e * s_we
        do_e = tl.load(wp, mask=rmask, other=0.0).to(tl.float32)[:, None] * g0
        if C > 1:
            do_e += tl.load(wp + s_wc, mask=rmask, other=0.0).to(tl.float32)[:, None] * g1
        if C > 2:
            do_e += tl.load(wp + 2 * s_wc, mask=rmask, other=0.0).to(tl.float32)[:, None] * g2
        return do_e

    @triton.autotune(configs=_CONFIGS, key=_KEY)
    @triton.jit
    def _bwd_rows_kernel(X, W, W1, W2, G, DX, DW, N, E, D_IN, F, D_OUT,
                         s_xn, s_wn, s_wc, s_we, s_w1e, s_w1d, s_w2e, s_w2f, s_gn, s_gc, s_dxn,
                         s_dwn, s_dwc, s_dwe,
                         C: tl.constexpr, BLOCK_N: tl.constexpr, BD_IN: tl.constexpr, BF: tl.constexpr,
                         BD_OUT: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        di, ff, do = tl.arange(0, BD_IN), tl.arange(0, BF), tl.arange(0, BD_OUT)
        x = _load_rows(X, rows, N, D_IN, s_xn, BD_IN)
        g0, g1, g2 = _load_grads(G, rows, rmask, do, D_OUT, s_gn, s_gc, C, BLOCK_N, BD_OUT)
        w1_mask = (di[:, None] < D_IN) & (ff[None, :] < F)
        w1t_mask = (ff[:, None] < F) & (di[None, :] < D_IN)
        w2_mask = (ff[:, None] < F) & (do[None, :] < D_OUT)
        w2t_mask = (do[:, None] < D_OUT) & (ff[None, :] < F)
        dx = tl.zeros((BLOCK_N, BD_IN), dtype=tl.float32)
        for e in range(E):
            w1 = tl.load(W1 + e * s_w1e + di[:, None] * s_w1d + ff[None, :], mask=w1_mask, other=0.0)
            a = tl.dot(x, w1, input_precision=PRECISION)
            s, ds_da = _silu_parts(a)
            w2 = tl.load(W2 + e * s_w2e + ff[:, None] * s_w2f + do[None, :], mask=w2_mask, other=0.0)
            o = tl.dot(s.to(w2.dtype), w2, input_precision=PRECISION)
            dwp = DW + rows * s_dwn + e * s_dwe
            tl.store(dwp, tl.sum(g0 * o, 1).to(DW.dtype.element_ty), mask=rmask)
            if C > 1:
                tl.store(dwp + s_dwc, tl.sum(g1 * o, 1).to(DW.dtype.element_ty), mask=rmask)
            if C > 2:
                tl.store(dwp + 2 * s_dwc, tl.sum(g2 * o, 1).to(DW.dtype.element_ty), mask=rmask)
            do_e = _expert_grad_out(W, rows, rmask, e, s_wn, s_wc, s_we, g0, g1, g2, C)
            w2t = tl.load(W2 + e * s_w2e + do[:, None] + ff[None, :] * s_w2f, mask=w2t_mask, other=0.0)
            da = tl.dot(do_e.to(w2.dtype), w2t, input_precision=PRECISION) * ds_da  # (BLOCK_N, BF)
            w1t = tl.load(W1 + e * s_w1e + ff[:, None] + di[None, :] * s_w1d, mask=w1t_mask, other=0.0)
            dx += tl.dot(da.to(w1.dtype), w1t, input_precision=PRECISION)
        tl.store(DX + rows[:, None] * s_dxn + di[None, :], dx.to(DX.dtype.element_ty),
                 mask=rmask[:, None] & (di[None, :] < D_IN))

    @triton.autotune(configs=_CONFIGS, key=_KEY)
    @triton.jit
    def _bwd_weights_kernel(X, W, W1, W2, G, DW1P, DW2P, N, E, D_IN, F, D_OUT,
                            s_xn, s_wn, s_wc, s_we, s_w1e, s_w1d, s_w2e, s_w2f, s_gn, s_gc,
                            C: tl.constexpr, BLOCK_N: tl.constexpr, BD_IN: tl.constexpr, BF: tl.constexpr,
                            BD_OUT: tl.constexpr, PRECISION: tl.constexpr):
        e, r, R = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        di, ff, do = tl.arange(0, BD_IN), tl.arange(0, BF), tl.arange(0, BD_OUT)
        w1_mask = (di[:, None] < D_IN) & (ff[None, :] < F)
        w2t_mask = (do[:, None] < D_OUT) & (ff[None, :] < F)
        w1 = tl.load(W1 + e * s_w1e + di[:, None] * s_w1d + ff[None, :], mask=w1_mask, other=0.0)
        w2t = tl.load(W2 + e * s_w2e + do[:, None] + ff[None, :] * s_w2f, mask=w2t_mask, other=0.0)
        dw1 = tl.zeros((BD_IN, BF), dtype=tl.float32)
        dw2 = tl.zeros((BF, BD_OUT), dtype=tl.float32)
        for b in range(r, tl.cdiv(N, BLOCK_N), R):
            rows = b * BLOCK_N + tl.arange(0, BLOCK_N)
            rmask = rows < N
            x = _load_rows(X, rows, N, D_IN, s_xn, BD_IN)
            s, ds_da = _silu_parts(tl.dot(x, w1, input_precision=PRECISION))
            g0, g1, g2 = _load_grads(G, rows, rmask, do, D_OUT, s_gn, s_gc, C, BLOCK_N, BD_OUT)
            do_e = _expert_grad_out(W, rows, rmask, e, s_wn, s_wc, s_we, g0, g1, g2, C).to(w1.dtype)
            dw2 += tl.dot(tl.trans(s.to(w1.dtype)), do_e, input_precision=PRECISION)
            da = tl.dot(do_e, w2t, input_precision=PRECISION) * ds_da
            dw1 += tl.dot(tl.trans(x), da.to(w1.dtype), input_precision=PRECISION)
        # partial sums of slice r: DW1P (R, E, D_IN, F) and DW2P (R, E, F, D_OUT), contiguous fp32
        base1 = DW1P + (r * E + e) * D_IN * F
        tl.store(base1 + di[:, None] * F + ff[None, :], dw1, mask=w1_mask)
        base2 = DW2P + (r * E + e) * F * D_OUT
        tl.store(base2 + ff[:, None] * D_OUT + do[None, :], dw2, mask=(ff[:, None] < F) & (do[None, :] < D_OUT))


def _blocks(d_in: int, hidden: int, d_out: int) -> dict[str, int]:
    """Power-of-two tile widths, at least 16 (tl.dot's minimum)."""
    bd_in, bf, bd_out = (max(16, triton.next_power_of_2(n)) for n in (d_in, hidden, d_out))
    return {"BD_IN": bd_in, "BF": bf, "BD_OUT": bd_out}


def _precision(dt: torch.dtype) -> str:
    return "tf32" if dt == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 elsewhere: Triton's CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


class FusedCompose(torch.autograd.Function):
    """``out = Σ_e w[..., e] · Expert_e(x)`` through the kernels above; inputs in any float dtype, computed in the
    autocast dtype where autocast is on (the output's dtype), else in x's."""

    @staticmethod
    def forward(ctx, x_ND, w_NCE, w1, w2):
        if triton is None:
            raise RuntimeError("the fused composition needs Triton (torch's CUDA builds ship it)")
        dt = compute_dtype(x_ND)
        x, w1_, w2_ = x_ND.to(dt).contiguous(), w1.to(dt).contiguous(), w2.to(dt).contiguous()
        w = w_NCE.contiguous()
        (N, C, E), (_, d_in, hidden), d_out = w.shape, w1_.shape, w2_.shape[2]
        if C > MAX_CHANNELS:
            raise ValueError(f"the fused composition takes at most {MAX_CHANNELS} channels, got {C}")
        blocks = _blocks(d_in, hidden, d_out)
        out = torch.empty(N, C, d_out, device=x.device, dtype=dt)
        if N:
            _fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
                x, w, w1_, w2_, out, N, E, d_in, hidden, d_out,
                x.stride(0), *w.stride(), w1_.stride(0), w1_.stride(1), w2_.stride(0), w2_.stride(1),
                out.stride(0), out.stride(1), C=C, PRECISION=_precision(dt), **blocks)
        ctx.save_for_backward(x, w, w1_, w2_)
        ctx.dtypes = (x_ND.dtype, w1.dtype, w2.dtype)
        return out

    @staticmethod
    def backward(ctx, g_NCd):
        x, w, w1, w2 = ctx.saved_tensors
        (N, C, E), (_, d_in, hidden), d_out = w.shape, w1.shape, w2.shape[2]
        g = g_NCd.contiguous()
        blocks = _blocks(d_in, hidden, d_out)
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        # slices of row blocks per expert for the weight gradients: about 4 programs per processor. Every slice is
        # written (zeros where it has no block), so that any autotuned block size leaves no stale partial sum
        R = triton.cdiv(4 * _processors(x.device), E)
        dw1p = torch.empty(R, E, d_in, hidden, device=x.device, dtype=torch.float32)
        dw2p = torch.empty(R, E, hidden, d_out, device=x.device, dtype=torch.float32)
        common = (N, E, d_in, hidden, d_out, x.stride(0), *w.stride(), w1.stride(0), w1.stride(1),
                  w2.stride(0), w2.stride(1), g.stride(0), g.stride(1))
        prec = _precision(x.dtype)
        if N:
            _bwd_rows_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
                x, w, w1, w2, g, dx, dw, *common, dx.stride(0), *dw.stride(), C=C, PRECISION=prec, **blocks)
        _bwd_weights_kernel[(E, R)](x, w, w1, w2, g, dw1p, dw2p, *common, C=C, PRECISION=prec, **blocks)
        dx_dt, w1_dt, w2_dt = ctx.dtypes
        return dx.to(dx_dt), dw, dw1p.sum(0).to(w1_dt), dw2p.sum(0).to(w2_dt)


def compose(x_ND: torch.Tensor, w_NCE: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(N, d_in), (N, C, E), (E, d_in, F), (E, F, d_out) -> (N, C, d_out), C <= 3, widths <= MAX_WIDTH."""
    return FusedCompose.apply(x_ND, w_NCE, w1, w2)
