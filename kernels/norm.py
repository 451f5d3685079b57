"""Residual add fused with the LayerNorm of the sum: ``sum = x + alpha * residual``,
``out = LayerNorm(sum)`` over the last dim, forward and backward.

Design: one program per tile of ``BLOCK_R`` whole rows (``BLOCK_D = next_power_of_2(D)``
columns), so a row's sum, statistics and output stay in registers: the forward reads ``x``
and ``residual`` once and writes ``sum`` and ``out`` once (one launch, no second pass over
the sum as an add followed by a norm makes). Wider rows get more warps instead of a column
loop; rows up to :data:`MAX_DIM` features are served. The backward recomputes ``x_hat`` from
the saved sum and the per-row ``mean`` / ``rstd``; the weight / bias gradients are fp32 (fp64
for fp64) partial sums per program, summed by the launcher (deterministic, no atomics, as
the depthwise conv's backward).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from dynenc.ops.norm import MAX_CUDA_FEATURES

from ._utils import device_arch, on_device_of_first_arg, opmath, opmath_dtype
from .specialization import KernelCall

MAX_DIM = MAX_CUDA_FEATURES  # 16 warps of whole rows: 16 fp32 values per thread and tile on NVIDIA, 8 on AMD
TILE = 2048  # elements of a [BLOCK_R, BLOCK_D] tile: 16 per thread with 4 warps
TARGET_PROGRAMS = 1024  # backward: enough row groups to fill a GPU, few partials


class NormConfig(NamedTuple):
    """Tile ``block_r`` rows x ``block_d`` columns and ``num_warps`` of both kernels."""

    block_r: int
    block_d: int
    num_warps: int

    def launch(self) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_D=self.block_d, num_warps=self.num_warps)


def norm_config(arch: Optional[str], dim: int) -> NormConfig:
    """Whole rows per tile: ``TILE // BLOCK_D`` rows (at least one) and 4 warps up to
    ``BLOCK_D = 2048``, then one row and ``BLOCK_D / 512`` warps (at most 16: AMD's 1024-lane
    workgroup), so a thread holds at most 16 values per tile (``python -m dynenc.kernels.report``
    checks sm_80/86/89/90 and gfx90a for spills)."""
    block_d = triton.next_power_of_2(max(dim, 1))
    return NormConfig(max(1, TILE // block_d), block_d, min(16, max(4, block_d // 512)))


@triton.jit(do_not_specialize=["num_rows"])
def _add_layer_norm_fwd_kernel(
    x, residual, weight, bias, sum_out, out, mean, rstd, alpha, eps, num_rows, dim,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``sum = x + alpha * residual`` (rounded to x's dtype, as stored) and
    ``out = (sum - mean) * rstd * weight + bias`` with the biased variance over ``dim``.

    Shapes: ``x``/``residual``/``sum_out``/``out`` ``[N, D]``, ``weight``/``bias`` ``[D]``,
    ``mean``/``rstd`` ``[N]`` in opmath (fp32, fp64 for fp64). Grid ``cdiv(N, BLOCK_R)``,
    ``BLOCK_D >= D``. Traffic per element: reads ``x`` and ``residual`` once, writes ``sum``
    and ``out`` once; per row 2 statistics; ``weight``/``bias`` once per program.
    """
    ACC: tl.constexpr = opmath(x.dtype.element_ty)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    col_ok = cols < dim
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    xv = tl.load(x + offsets, mask=ok, other=0.0).to(ACC)
    rv = tl.load(residual + offsets, mask=ok, other=0.0).to(ACC)
    s = (xv + alpha * rv).to(sum_out.dtype.element_ty)
    tl.store(sum_out + offsets, s, mask=ok)
    s = s.to(ACC)  # the statistics of the rounded sum the caller gets back
    m = tl.sum(s, axis=1) / dim
    diff = tl.where(ok, s - m[:, None], 0.0)
    r = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / dim + eps)
    y = diff * r[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(out + offsets, y.to(out.dtype.element_ty), mask=ok)
    tl.store(mean + rows, m, mask=row_ok)
    tl.store(rstd + rows, r, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows", "tiles_per_program"])
def _add_layer_norm_bwd_kernel(
    grad_out, grad_sum, sum_in, mean, rstd, weight, grad_x, grad_residual, partial_w, partial_b, alpha,
    num_rows, dim, tiles_per_program,
    HAS_GRAD_SUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """All four gradients in one pass over ``grad_out`` and ``sum``.

    With ``x_hat = (sum - mean) * rstd`` and ``g = grad_out * weight``:
    ``grad_x = rstd * (g - x_hat * mean_d(g * x_hat) - mean_d(g)) + grad_sum``,
    ``grad_residual = alpha * grad_x``; program ``p`` handles ``tiles_per_program`` consecutive
    row tiles and writes ``partial_w[p] = sum_rows grad_out * x_hat`` and
    ``partial_b[p] = sum_rows grad_out`` (``[D]`` each, opmath), summed by the launcher.
    Grid ``(G,)``. Traffic per element: reads ``grad_out``, ``sum`` (and ``grad_sum``) once,
    writes ``grad_x`` and ``grad_residual`` once; plus ``2 * G * D`` partials.
    """
    ACC: tl.constexpr = opmath(sum_in.dtype.element_ty)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    if HAS_WEIGHT:
        w = tl.load(weight + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        w = tl.full([1, BLOCK_D], 1.0, dtype=ACC)
    acc_w = tl.zeros([BLOCK_D], dtype=ACC)
    acc_b = tl.zeros([BLOCK_D], dtype=ACC)
    for i in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < num_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
        go = tl.load(grad_out + offsets, mask=ok, other=0.0).to(ACC)
        m = tl.load(mean + rows, mask=row_ok, other=0.0).to(ACC)
        r = tl.load(rstd + rows, mask=row_ok, other=0.0).to(ACC)
        xhat = tl.where(ok, (tl.load(sum_in + offsets, mask=ok, other=0.0).to(ACC) - m[:, None]) * r[:, None], 0.0)
        acc_w += tl.sum(go * xhat, axis=0)
        acc_b += tl.sum(go, axis=0)
        g = go * w
        c1 = tl.sum(g * xhat, axis=1) / dim
        c2 = tl.sum(g, axis=1) / dim
        dx = (g - xhat * c1[:, None] - c2[:, None]) * r[:, None]
        if HAS_GRAD_SUM:
            dx += tl.load(grad_sum + offsets, mask=ok, other=0.0).to(ACC)
        tl.store(grad_x + offsets, dx.to(grad_x.dtype.element_ty), mask=ok)
        tl.store(grad_residual + offsets, (alpha * dx).to(grad_residual.dtype.element_ty), mask=ok)
    group = tl.program_id(0).to(tl.int64) * dim
    tl.store(partial_w + group + cols, acc_w, mask=col_ok)
    tl.store(partial_b + group + cols, acc_b, mask=col_ok)


@on_device_of_first_arg
def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, alpha: float, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(sum [N, D], out [N, D], mean [N], rstd [N])`` (reference: dynenc/ops/norm.py)."""
    num_rows, dim = x.shape
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    out = torch.empty_like(total)
    mean = torch.empty(num_rows, dtype=opmath_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    if num_rows:
        config = norm_config(device_arch(x), dim)
        _add_layer_norm_fwd_kernel[(triton.cdiv(num_rows, config.block_r),)](
            x.contiguous(), residual.contiguous(), None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous(), total, out, mean, rstd, float(alpha), float(eps),
            num_rows, dim, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **config.launch(),
        )
    return total, out, mean, rstd


@on_device_of_first_arg
def add_layer_norm_backward(grad_out: torch.Tensor, grad_sum: Optional[torch.Tensor], sum: torch.Tensor,
                            mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], alpha: float
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(grad_x [N, D], grad_residual [N, D], grad_weight [D] (weight's dtype, sum's without
    weight), grad_bias [D] (sum's dtype))``; ``grad_sum=None`` counts as zero."""
    num_rows, dim = sum.shape
    grad_x = torch.empty_like(sum, memory_format=torch.contiguous_format)
    grad_residual = torch.empty_like(grad_x)
    weight_dtype = sum.dtype if weight is None else weight.dtype
    if num_rows == 0:
        return grad_x, grad_residual, sum.new_zeros(dim, dtype=weight_dtype), sum.new_zeros(dim)
    config = norm_config(device_arch(sum), dim)
    num_tiles = triton.cdiv(num_rows, config.block_r)
    tiles_per_program = triton.cdiv(num_tiles, min(num_tiles, TARGET_PROGRAMS))
    groups = triton.cdiv(num_tiles, tiles_per_program)
    partial_w = torch.empty((groups, dim), dtype=opmath_dtype(sum.dtype), device=sum.device)
    partial_b = torch.empty_like(partial_w)
    _add_layer_norm_bwd_kernel[(groups,)](
        grad_out.contiguous(), None if grad_sum is None else grad_sum.contiguous(), sum.contiguous(),
        mean.contiguous(), rstd.contiguous(), None if weight is None else weight.contiguous(), grad_x, grad_residual,
        partial_w, partial_b, float(alpha), num_rows, dim, tiles_per_program,
        HAS_GRAD_SUM=grad_sum is not None, HAS_WEIGHT=weight is not None, **config.launch(),
    )
    return grad_x, grad_residual, partial_w.sum(0).to(weight_dtype), partial_b.sum(0).to(sum.dtype)


AOT_DIMS = (256, MAX_DIM)  # a Conformer width (dim is specialised, % 16, like any model constant), the widest


def aot_calls(arch: str, dtypes=(torch.float32, torch.bfloat16, torch.float16), dims=AOT_DIMS):
    """The launches of both launchers on ``arch`` per (dtype, D), with weight, bias and a
    gradient of the sum (the Conformer's case; the widest D last: the report's subset)."""
    calls = []
    stats = torch.empty(1, dtype=torch.float32, device="meta")
    for dtype in dtypes:
        t = torch.empty((1, 1), dtype=dtype, device="meta")
        for dim in dims:
            config = norm_config(arch, dim)
            variant = f"{str(dtype).removeprefix('torch.')},d{dim}"
            calls += [
                KernelCall(_add_layer_norm_fwd_kernel, variant, (t, t, t, t, t, t, stats, stats, 0.5, 1e-5, 100, dim),
                           dict(HAS_WEIGHT=True, HAS_BIAS=True, **config.launch())),
                KernelCall(_add_layer_norm_bwd_kernel, variant,
                           (t, t, t, stats, stats, t, t, t, stats, stats, 0.5, 100, dim, 4),
                           dict(HAS_GRAD_SUM=True, HAS_WEIGHT=True, **config.launch())),
            ]
    return calls
