"""Depthwise 'same' conv1d over packed variable-length sequences (channels last).

Rows never see across a sequence edge: each row finds its sequence ``[start, end)`` by
bisection over ``cu_seqlens`` (``log2(B)`` cached loads per row, no extra buffers), and taps
outside it read zero.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import device_arch, find_segment, on_device_of_first_arg, opmath, opmath_dtype, search_steps
from .specialization import KernelCall

MAX_BLOCK_C = 64
TARGET_PROGRAMS = 1024  # backward: enough row groups to fill a GPU, few fp32 partials
RAGGED_INTS = ["num_rows", "num_seqs", "num_steps"]


class DwconvConfig(NamedTuple):
    """Tiles and launch options of the dwconv kernels: ``block_t`` rows x ``block_c``
    channels per tile; ``forward`` / ``backward``: ``(num_warps, num_stages)``."""

    block_t: int
    block_c: int
    forward: Tuple[int, int]
    backward: Tuple[int, int]

    def launch(self, kernel_options: Tuple[int, int]) -> dict:
        warps, stages = kernel_options
        return dict(BLOCK_T=self.block_t, BLOCK_C=self.block_c, num_warps=warps, num_stages=stages)


def dwconv_config(arch: Optional[str], dtype: torch.dtype, channels: int, kernel_size: int) -> DwconvConfig:
    """32 x 64 tiles on every arch (``python -m dynenc.kernels.report`` checks each (arch,
    dtype, K)); the backward keeps a ``[BLOCK_C, BLOCK_K]`` weight-gradient accumulator and
    three tiles per tap live, so it gets 8 warps (4 spilled for fp32, K = 31 on sm_90)."""
    return DwconvConfig(32, min(triton.next_power_of_2(channels), MAX_BLOCK_C), forward=(4, 3), backward=(8, 3))


@triton.jit
def _row_bounds(cu_seqlens, rows, row_ok, num_seqs, num_steps):
    """``[start, end)`` of each row's sequence; empty for rows past ``N``."""
    seq = find_segment(cu_seqlens, rows, num_seqs, num_steps)
    start = tl.load(cu_seqlens + seq)
    end = tl.where(row_ok, tl.load(cu_seqlens + seq + 1), start)
    return start, end


@triton.jit
def _load_shifted(ptr, rows, shift, start, end, cols, col_ok, channels):
    """Tile ``ptr[rows + shift, cols]`` in opmath dtype, zero where the source row leaves
    ``[start, end)``."""
    src = rows + shift
    ok = (src >= start) & (src < end)
    tile = tl.load(ptr + src.to(tl.int64)[:, None] * channels + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                   other=0.0)
    return tile.to(opmath(ptr.dtype.element_ty))


@triton.jit
def _load_tap(weight, cols, col_ok, k, K: tl.constexpr, ACC: tl.constexpr):
    """``weight[cols, k]`` of a ``[C, K]`` weight as a ``[1, BLOCK_C]`` row of dtype ``ACC``."""
    return tl.load(weight + cols * K + k, mask=col_ok, other=0.0).to(ACC)[None, :]


@triton.jit(do_not_specialize=RAGGED_INTS)
def _dwconv_fwd_kernel(
    x, cu_seqlens, weight, bias, out, num_rows, channels, num_seqs, num_steps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[t, c] = bias[c] + sum_k weight[c, k] * x[t + k - (K - 1) // 2, c]`` (same sequence).

    Shapes: ``x``/``out`` ``[N, C]``, ``cu_seqlens`` int32 ``[B + 1]``, ``weight`` ``[C, K]``,
    ``bias`` ``[C]``. Grid ``(cdiv(N, BLOCK_T), cdiv(C, BLOCK_C))``. Traffic per element:
    ``x`` is read once from DRAM (the K shifted tile loads overlap and hit L1/L2; a tile
    touches ``BLOCK_T + K - 1`` rows), ``out`` written once; weight/bias/cu_seqlens are tiny.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    col_ok = cols < channels
    start, end = _row_bounds(cu_seqlens, rows, row_ok, num_seqs, num_steps)
    ACC: tl.constexpr = opmath(x.dtype.element_ty)
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    # A loop, not static_range: unrolled, all K shifted tiles were loaded up front and held
    # (255 registers and spills for fp32, K = 31); looped, one tap is live at a time.
    for k in range(K):
        tap = _load_tap(weight, cols, col_ok, k, K, ACC)
        acc += tap * _load_shifted(x, rows, k - (K - 1) // 2, start, end, cols, col_ok, channels)
    tl.store(out + rows.to(tl.int64)[:, None] * channels + cols[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=[*RAGGED_INTS, "tiles_per_program"])
def _dwconv_bwd_kernel(
    grad_out, x, cu_seqlens, weight, grad_x, partial_w, partial_b, num_rows, channels, num_seqs, num_steps,
    tiles_per_program,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """All three gradients in one pass over ``grad_out`` and ``x``.

    ``grad_x[s] = sum_k weight[:, k] * grad_out[s - k + pad]`` (the forward with mirrored
    taps, same-sequence rule), ``grad_weight[:, k] = sum_t grad_out[t] * x[t + k - pad]``,
    ``grad_bias = sum_t grad_out[t]``. Program ``(g, c)`` handles ``tiles_per_program``
    consecutive row tiles and writes partials ``partial_w[g] [C, K]`` and ``partial_b[g] [C]``
    in fp32 (fp64 for fp64 inputs), summed by the launcher: deterministic, no atomics.
    Grid ``(G, cdiv(C, BLOCK_C))``. Traffic per element: reads ``grad_out`` and ``x`` once
    from DRAM (shifted reloads hit cache), writes ``grad_x`` once; plus ``G * C * (K + 1)``
    partials, few because ``G * cdiv(C, BLOCK_C)`` is about ``TARGET_PROGRAMS``.
    """
    pad: tl.constexpr = (K - 1) // 2
    ACC: tl.constexpr = opmath(x.dtype.element_ty)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    taps = tl.arange(0, BLOCK_K)[None, :]
    acc_w = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
    acc_b = tl.zeros([BLOCK_C], dtype=ACC)
    for i in range(tiles_per_program):
        rows = (tl.program_id(0) * tiles_per_program + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_rows
        start, end = _row_bounds(cu_seqlens, rows, row_ok, num_seqs, num_steps)
        go = _load_shifted(grad_out, rows, 0, start, end, cols, col_ok, channels)
        acc_b += tl.sum(go, axis=0)
        gx = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
        for k in range(K):  # looped like the forward's taps
            tap = _load_tap(weight, cols, col_ok, k, K, ACC)
            gx += tap * _load_shifted(grad_out, rows, pad - k, start, end, cols, col_ok, channels)
            xs = _load_shifted(x, rows, k - pad, start, end, cols, col_ok, channels)
            # Register tiles cannot be indexed by k: add the tap's column with a select.
            acc_w += tl.where(taps == k, tl.sum(go * xs, axis=0)[:, None], 0.0)
        tl.store(grad_x + rows.to(tl.int64)[:, None] * channels + cols[None, :], gx.to(grad_x.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    group = tl.program_id(0).to(tl.int64) * channels
    tl.store(partial_w + (group + cols[:, None]) * K + taps, acc_w, mask=col_ok[:, None] & (taps < K))
    tl.store(partial_b + group + cols, acc_b, mask=col_ok)


@on_device_of_first_arg
def varlen_dwconv1d(x: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Depthwise 'same' conv1d over packed sequences: ``[N, C]`` -> ``[N, C]``."""
    num_rows, channels = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel():
        num_seqs = cu_seqlens.numel() - 1
        config = dwconv_config(device_arch(x), x.dtype, channels, weight.shape[1])
        grid = (triton.cdiv(num_rows, config.block_t), triton.cdiv(channels, config.block_c))
        _dwconv_fwd_kernel[grid](
            x.contiguous(), cu_seqlens.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            out, num_rows, channels, num_seqs, search_steps(num_seqs),
            K=weight.shape[1], HAS_BIAS=bias is not None, **config.launch(config.forward),
        )
    return out


@on_device_of_first_arg
def varlen_dwconv1d_backward(grad_out: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor,
                             weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(grad_x [N, C], grad_weight [C, K] (weight's dtype), grad_bias [C] (x's dtype))``."""
    (num_rows, channels), kernel_size = x.shape, weight.shape[1]
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if grad_x.numel() == 0:
        return grad_x, torch.zeros_like(weight), x.new_zeros(channels)
    num_seqs = cu_seqlens.numel() - 1
    config = dwconv_config(device_arch(x), x.dtype, channels, kernel_size)
    num_tiles, num_cblocks = triton.cdiv(num_rows, config.block_t), triton.cdiv(channels, config.block_c)
    tiles_per_program = triton.cdiv(num_tiles, max(1, min(num_tiles, TARGET_PROGRAMS // num_cblocks)))
    groups = triton.cdiv(num_tiles, tiles_per_program)
    partial_w = torch.empty((groups, channels, kernel_size), dtype=opmath_dtype(x.dtype), device=x.device)
    partial_b = torch.empty((groups, channels), dtype=opmath_dtype(x.dtype), device=x.device)
    _dwconv_bwd_kernel[(groups, num_cblocks)](
        grad_out.contiguous(), x.contiguous(), cu_seqlens.contiguous(), weight.contiguous(), grad_x, partial_w,
        partial_b, num_rows, channels, num_seqs, search_steps(num_seqs), tiles_per_program,
        K=kernel_size, BLOCK_K=triton.next_power_of_2(kernel_size), **config.launch(config.backward),
    )
    return grad_x, partial_w.sum(0).to(weight.dtype), partial_b.sum(0).to(x.dtype)


AOT_CHANNELS = 256  # a Conformer width; channels is specialised (% 16) like any model constant


def aot_calls(arch: str, dtypes=(torch.float32, torch.bfloat16, torch.float16), kernel_sizes=(15, 31)):
    """The launches of both launchers on ``arch`` per (dtype, K), with bias (the Conformer's)."""
    calls = []
    cu = torch.empty(2, dtype=torch.int32, device="meta")
    partials = torch.empty(1, dtype=torch.float32, device="meta")
    ragged = (100, AOT_CHANNELS, 3, 2)  # num_rows, channels, num_seqs, num_steps
    for dtype in dtypes:
        t = torch.empty((1, AOT_CHANNELS), dtype=dtype, device="meta")
        for kernel_size in kernel_sizes:
            config = dwconv_config(arch, dtype, AOT_CHANNELS, kernel_size)
            variant = f"{str(dtype).removeprefix('torch.')},k{kernel_size}"
            calls += [
                KernelCall(_dwconv_fwd_kernel, variant, (t, cu, t, t, t, *ragged),
                           dict(K=kernel_size, HAS_BIAS=True, **config.launch(config.forward))),
                KernelCall(_dwconv_bwd_kernel, variant, (t, t, cu, t, t, partials, partials, *ragged, 4),
                           dict(K=kernel_size, BLOCK_K=triton.next_power_of_2(kernel_size),
                                **config.launch(config.backward))),
            ]
    return calls
