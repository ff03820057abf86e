"""Expert libraries (DESIGN §3.2): E experts with ``ExpertMLP`` semantics ``w2(silu(w1(x)))``, bias-free.

A library stores its experts as stacked weights, ``w1: (E, d_in, F)`` and ``w2: (E, F, d_out)``, so that expert e
computes ``silu(x @ w1[e]) @ w2[e]``, and evaluates them with batched matmuls instead of a Python loop of modules.
Ways to run it:

- :meth:`ExpertLibrary.compose` runs every expert on every row and returns weighted sums of their outputs, C
  weightings at once (the attention library's dense composition), by one of three paths (:data:`COMPOSE_PATHS`):
  ``experts`` (per-expert batched GEMMs in row chunks), ``gemm`` (the routing weights folded into the hidden
  activations, contracted over experts x hidden in one GEMM per chunk) or ``fused`` (a Triton kernel on CUDA,
  ``model/fused.py``); :func:`default_compose_path` picks the one measured fastest on the device;
- :meth:`ExpertLibrary.compose_sparse` computes the same sums from the active (row, expert) pairs only;
- :meth:`ExpertLibrary.dense` returns every expert's outputs themselves;
- :meth:`ExpertLibrary.grouped` runs each row through one expert, rows sorted by expert (the sparse FFN), as
  :func:`group_by_expert` lays them out.

:class:`ExpertMLP` is the plain per-expert module that defines the semantics; tests compare against it.
Shapes: ``N`` rows, ``C`` weightings (channels), ``E`` experts, ``F`` hidden width, ``M`` (row, expert) pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .layers import compute_dtype

COMPOSE_PATHS = ("experts", "manual", "gemm", "fused")


def default_compose_path(x: torch.Tensor, lib: "ExpertLibrary") -> str:
    """The composition path for rows ``x``, measured (benchmarks/bench_layers.py, gpu_step.py):

    - CPU: ``manual``, in chunks of 512 rows. The same per-expert GEMMs as ``experts``, but its activations are laid
      out expert-major and its backward is written out: at tiny's shapes (E = 16, F = d = 32, forward + backward)
      1.15x faster than ``experts`` in its 256-row chunks on 2 threads, 1.06x on 1 (bench_compose.py; 46% of the
      fp32 matmul rate in bench_layers.py, 1.27x there). ``gemm`` does its
      contraction over experts x hidden as one GEMM per chunk but with the weighting folded into the hidden
      activations, which costs C times the second layer's FLOPs plus passes over (rows, C, E*F) tensors: 17%;
    - CUDA: ``fused`` where Triton is importable and the widths fit its registers, else ``experts``: the model's
      FLOPs and no (rows, E*F) activations in memory; at base's shapes on an H200, 8.0% of the bf16 matmul rate
      against 7.5% (``experts``) and 1.3% (``gemm``), and a 32k-token base step peaks at 17 GiB instead of 68.
      Under torch.compile always ``experts``, which the compiler can trace.
    """
    if torch.compiler.is_compiling():
        return "experts"
    if x.is_cuda:
        return "fused" if fused.fits(lib.d_in, lib.hidden, lib.d_out) else "experts"
    return "manual"


def group_by_expert(active_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (row, expert) pairs where the boolean ``active_NE`` is set, sorted by expert: their experts ``e_M``,
    their rows ``n_M``, and the number of rows of each expert ``counts_E`` (the layout of :meth:`grouped`)."""
    e_M, n_M = torch.nonzero(active_NE.T, as_tuple=True)  # row-major over (E, N): sorted by expert
    return e_M, n_M, torch.bincount(e_M, minlength=active_NE.shape[1])


def _grouped_mm_ok(dt: torch.dtype, cuda: bool, *widths: int) -> bool:
    if not hasattr(torch, "_grouped_mm") or dt != (torch.bfloat16 if cuda else torch.float32):
        return False
    if not cuda and torch.compiler.is_compiling():  # the CPU kernel has no fake-tensor rule: dynamo cannot trace it
        return False
    # the kernel wants every row stride to be a multiple of 16 bytes
    per16 = 128 // torch.finfo(dt).bits  # elements per 16 bytes
    return all(n % per16 == 0 for n in widths)


def grouped_mlp(x_MD: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, counts_E: torch.Tensor
                ) -> torch.Tensor:
    """Rows sorted by expert, ``counts_E[e]`` rows for expert e, each through ``silu(x @ w1[e]) @ w2[e]`` -> outputs
    in the same order.

    Two grouped GEMMs (``torch._grouped_mm``: CUDA bf16, and CPU fp32 where it measured faster than a loop) with no
    host sync on CUDA; otherwise (float64, older torch) a loop over the experts that received rows. Either way an
    expert with no rows costs nothing.
    """
    dt = compute_dtype(x_MD)
    if _grouped_mm_ok(dt, x_MD.is_cuda, *w1_EDF.shape[1:], w2_EFD.shape[2]):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        hid = F.silu(torch._grouped_mm(x_MD.to(dt), w1_EDF.to(dt), offs=offs))
        return torch._grouped_mm(hid, w2_EFD.to(dt), offs=offs)
    counts = counts_E.tolist()
    outs = [F.silu(part @ w1_EDF[e]) @ w2_EFD[e] for e, part in enumerate(torch.split(x_MD, counts)) if counts[e]]
    return torch.cat(outs) if outs else x_MD.new_zeros(0, w2_EFD.shape[2])


class ExpertMLP(nn.Module):
    """One expert as plain modules: the reference semantics of a library entry."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.w1 = nn.Linear(d_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)))


class ExpertLibrary(nn.Module):
    def __init__(self, n_experts: int, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.n_experts, self.d_in, self.hidden, self.d_out = n_experts, d_in, hidden, d_out
        self.w1 = nn.Parameter(torch.empty(n_experts, d_in, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_out))

    def init_weights(self, out_std: float) -> None:
        """w1 ~ N(0, 1/d_in) keeps pre-activations at unit scale; w2 ~ N(0, out_std^2) sets the output scale."""
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.d_in))
        nn.init.normal_(self.w2, std=out_std)

    @torch.no_grad()
    def load_experts(self, experts: list[ExpertMLP]) -> None:
        """Copy plain ``ExpertMLP`` weights in (nn.Linear stores the transpose)."""
        for e, m in enumerate(experts):
            self.w1[e].copy_(m.w1.weight.T)
            self.w2[e].copy_(m.w2.weight.T)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone (reference path, used by tests)."""
        return F.silu(x @ self.w1[e]) @ self.w2[e]

    def dense(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: (N, d_in) -> ``out_END`` (E, N, d_out)."""
        E, F_ = self.n_experts, self.hidden
        # One GEMM (N, d) @ (d, E*F); bmm takes the expert-major strided view of it without a copy.
        s_NEF = F.silu(x_ND @ self.w1.transpose(0, 1).reshape(self.d_in, E * F_)).view(-1, E, F_)
        return torch.bmm(s_NEF.transpose(0, 1), self.w2)

    def compose(self, x_ND: torch.Tensor, w_NCE: torch.Tensor, chunk: int | None = None,
                path: str | None = None) -> torch.Tensor:
        """Dense composition: ``out[n, c] = Σ_e w[n, c, e] · Expert_e(x[n])`` for C weightings at once, every
        expert run once per row. (N, d_in), (N, C, E) -> (N, C, d_out). ``path``: one of :data:`COMPOSE_PATHS`
        (default: :func:`default_compose_path`); ``chunk``: rows per chunk of the ``experts`` and ``gemm`` paths.
        """
        path = path or default_compose_path(x_ND, self)
        if path == "fused":
            return fused.compose(x_ND, w_NCE, self.w1, self.w2)
        if path == "manual":
            # under no_grad (inference) the activations are not kept for a backward
            return ExpertsCompose.apply(x_ND, w_NCE, self.w1, self.w2, chunk or 512, torch.is_grad_enabled())
        if path == "gemm":
            if chunk is None:  # (rows, C, E*F) elements at a time: 2^21 on CPU (warm in cache), 2^28 on CUDA
                budget = 2 ** 28 if x_ND.is_cuda else 2 ** 21
                chunk = max(1, budget // (w_NCE.shape[1] * self.n_experts * self.hidden))
            return GemmCompose.apply(x_ND, w_NCE, self.w1, self.w2, chunk)
        if path != "experts":
            raise ValueError(f"unknown composition path {path!r}; paths: {', '.join(COMPOSE_PATHS)}")
        # Rows in chunks of 256 on CPU: the (chunk, E, F) hidden activations then stay warm in cache (measured
        # fastest of 128-1024 at E = 16 and 64). On CUDA one chunk covers everything.
        if chunk is None:
            chunk = x_ND.shape[0] if x_ND.is_cuda else 256
        E, F_ = self.n_experts, self.hidden
        w1_cat = self.w1.transpose(0, 1).reshape(self.d_in, E * F_)
        outs = []
        # split, not slices: the backward of each slice would scatter into a zero tensor of the full size
        for x, w in zip(x_ND.split(chunk), w_NCE.split(chunk)):
            s_EnF = F.silu(x @ w1_cat).view(-1, E, F_).transpose(0, 1)
            out_End = torch.bmm(s_EnF, self.w2)
            outs.append(torch.bmm(w, out_End.transpose(0, 1)))  # (n, C, E) @ (n, E, d_out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def compose_sparse(self, x_ND: torch.Tensor, w_NCE: torch.Tensor, rows_N: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """:meth:`compose` computing only the (row, expert) pairs where some channel's weight is non-zero (and
        the row is in the boolean ``rows_N``; other rows get 0): each such pair runs its expert once, through
        :meth:`grouped`, and its output is added to the C channels with their weights. An expert whose weights are
        all zero contributes exactly 0 in :meth:`compose` too, so on the rows computed the two agree up to the
        order of the sum. (N, d_in), (N, C, E) -> (N, C, d_out)."""
        N, C, _ = w_NCE.shape
        active_NE = (w_NCE != 0).any(1)
        if rows_N is not None:
            active_NE = active_NE & rows_N[:, None]
        e_M, n_M, counts_E = group_by_expert(active_NE)
        out_Md = self.grouped(x_ND[n_M], counts_E)
        w_MC = w_NCE[n_M, :, e_M].to(out_Md.dtype)
        return out_Md.new_zeros(N, C, self.d_out).index_add_(0, n_M, w_MC[:, :, None] * out_Md[:, None, :])

    def grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, ``counts_E[e]`` rows for expert e -> outputs in the same order
        (:func:`grouped_mlp` over this library's weights)."""
        return grouped_mlp(x_MD, self.w1, self.w2, counts_E)


class ExpertsCompose(torch.autograd.Function):
    """The ``manual`` composition path: the ``experts`` path's GEMMs, on activations laid out expert-major, with the
    backward written out. Per chunk of rows (``E`` GEMMs of each shape, ``bmm``):

        a_E = x @ w1[e]  (E, n, F)     s_E = silu(a_E)     o_E = s_E @ w2[e]  (E, n, d)     out = w @ o  (n, C, d)
        dw = g @ oᵀ      do_E = Σ_c w[:, c, e] g[:, c]      ds_E = do_E @ w2[e]ᵀ      da_E = ds_E ⊙ silu'(a_E)
        dx = Σ_e da_E @ w1[e]ᵀ      dw1[e] = Σ_n xᵀ da_E      dw2[e] = Σ_n s_Eᵀ do_E

    What autograd does for the ``experts`` path, less its layout costs (seen with torch.profiler, a diagnosis, not a
    benchmark: the second layer's batched GEMM on the row-major (n, E*F) activations ran at a third of the rate of
    the same GEMM on expert-major ones, and autograd's split/cat copies every row once more): every GEMM here takes
    contiguous operands, the outputs are written in place, the activations ``a_E``, ``s_E`` and ``o_E`` of each chunk
    are kept for the backward (only when grad mode is on at the call: ``keep``).
    Float64 gradients equal the per-expert reference (tests/test_model.py)."""

    @staticmethod
    def forward(ctx, x_ND, w_NCE, w1, w2, chunk, keep):
        dt = compute_dtype(x_ND)
        with torch.autocast(x_ND.device.type, enabled=False):
            x, w, w1c, w2c = x_ND.to(dt), w_NCE.to(dt), w1.to(dt), w2.to(dt)
            N, C, E = w.shape
            out = x.new_empty(N, C, w2c.shape[2])
            saved = []
            for i in range(0, N, chunk):
                j = min(i + chunk, N)
                a_E = torch.bmm(x[i:j].expand(E, -1, -1), w1c)  # (E, n, F)
                s_E = F.silu(a_E)
                o_E = torch.bmm(s_E, w2c)  # (E, n, d)
                torch.bmm(w[i:j], o_E.transpose(0, 1), out=out[i:j])
                if keep:
                    saved.append((a_E, s_E, o_E))
        ctx.save_for_backward(x_ND, w_NCE, w1, w2)
        ctx.chunk, ctx.dt, ctx.acts = chunk, dt, saved
        return out

    @staticmethod
    def backward(ctx, g_NCd):
        x_ND, w_NCE, w1, w2 = ctx.saved_tensors
        with torch.autocast(x_ND.device.type, enabled=False):
            dt = ctx.dt
            x, w, w1c, w2c = x_ND.to(dt), w_NCE.to(dt), w1.to(dt), w2.to(dt)
            g = g_NCd.to(dt).contiguous()
            N, C, E = w.shape
            dx, dw = torch.empty_like(x), torch.empty_like(w)
            dw1, dw2 = torch.zeros_like(w1c), torch.zeros_like(w2c)
            w1T, w2T = w1c.transpose(1, 2), w2c.transpose(1, 2)
            for k, i in enumerate(range(0, N, ctx.chunk)):
                j = min(i + ctx.chunk, N)
                a_E, s_E, o_E = ctx.acts[k]
                g_i = g[i:j]
                torch.bmm(g_i, o_E.permute(1, 2, 0), out=dw[i:j])  # (n, C, d) @ (n, d, E)
                do_E = torch.bmm(w[i:j].transpose(1, 2), g_i).transpose(0, 1).contiguous()  # (E, n, d)
                dw2.baddbmm_(s_E.transpose(1, 2), do_E)
                da_E = torch.ops.aten.silu_backward(torch.bmm(do_E, w2T), a_E)  # (E, n, F)
                torch.sum(torch.bmm(da_E, w1T), 0, out=dx[i:j])
                dw1.baddbmm_(x[i:j].T.expand(E, -1, -1), da_E)
        ctx.acts = None
        return dx.to(x_ND.dtype), dw.to(w_NCE.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype), None, None


class GemmCompose(torch.autograd.Function):
    """The ``gemm`` composition path: with ``s = silu(x @ w1_cat)`` (n, E*F) and ``A_c[n, e*F + f] =
    w[n, c, e] * s[n, e*F + f]``, ``out[:, c] = A_c @ w2_cat`` (w2_cat: (E*F, d_out)): the contraction over
    experts x hidden is one GEMM for all C channels of a chunk of rows. Its backward is written out (``A`` is
    rebuilt per chunk, never stored):

        dA_c = g_c @ w2_catᵀ      dw[n, c, e] = Σ_f dA_c[n, e, f] s[n, e, f]      dw2_cat = Σ_c A_cᵀ g_c
        ds = Σ_c w[:, c] ⊙ dA_c   da = ds ⊙ silu'(a)      dx = da @ w1_catᵀ        dw1_cat = xᵀ da
    """

    @staticmethod
    def forward(ctx, x_ND, w_NCE, w1, w2, chunk):
        dt = compute_dtype(x_ND)
        with torch.autocast(x_ND.device.type, enabled=False):
            x, w, w1c, w2c = GemmCompose._cast(x_ND, w_NCE, w1, w2, dt)
            N, C, E = w.shape
            out = x.new_empty(N * C, w2c.shape[1])
            for i in range(0, N, chunk):
                j = min(i + chunk, N)
                s_n1EF = F.silu(x[i:j] @ w1c).view(j - i, 1, E, -1)
                A = (w[i:j, :, :, None] * s_n1EF).view((j - i) * C, -1)  # (n*C, E*F)
                torch.mm(A, w2c, out=out[i * C:j * C])
        ctx.save_for_backward(x_ND, w_NCE, w1, w2)
        ctx.chunk, ctx.dt = chunk, dt
        return out.view(N, C, -1)

    @staticmethod
    def backward(ctx, g_NCd):
        x_ND, w_NCE, w1, w2 = ctx.saved_tensors
        with torch.autocast(x_ND.device.type, enabled=False):
            x, w, w1c, w2c = GemmCompose._cast(x_ND, w_NCE, w1, w2, ctx.dt)
            g = g_NCd.to(ctx.dt)
            N, C, E = w.shape
            dx, dw = torch.empty_like(x), torch.empty_like(w)
            dw1c, dw2c = torch.zeros_like(w1c), torch.zeros_like(w2c)
            for i in range(0, N, ctx.chunk):
                j = min(i + ctx.chunk, N)
                a = x[i:j] @ w1c  # recomputed: (n, E*F)
                s_n1EF = F.silu(a).view(j - i, 1, E, -1)
                g_i = g[i:j].reshape((j - i) * C, -1)
                dA_nCEF = (g_i @ w2c.T).view(j - i, C, E, -1)
                dw2c.addmm_((w[i:j, :, :, None] * s_n1EF).view((j - i) * C, -1).T, g_i)
                dw[i:j] = (dA_nCEF * s_n1EF).sum(-1)
                ds = torch.einsum("nce,ncef->nef", w[i:j], dA_nCEF).reshape(j - i, -1)
                da = torch.ops.aten.silu_backward(ds, a)
                torch.mm(da, w1c.T, out=dx[i:j])
                dw1c.addmm_(x[i:j].T, da)
        E_, d_in, F_ = w1.shape
        return (dx.to(x_ND.dtype), dw.to(w_NCE.dtype), dw1c.view(d_in, E_, F_).transpose(0, 1).to(w1.dtype),
                dw2c.view(E_, F_, -1).to(w2.dtype), None)

    @staticmethod
    def _cast(x, w, w1, w2, dt):
        """Inputs in the compute dtype, the weights as (d_in, E*F) and (E*F, d_out) matrices."""
        E, d_in, F_ = w1.shape
        return (x.to(dt), w.to(dt), w1.to(dt).transpose(0, 1).reshape(d_in, E * F_),
                w2.to(dt).reshape(E * F_, -1))
