"""Routing plan: per-layer active row indices and active-subset ``cu_seqlens`` from a row mask.

Three launches and one host sync (the size of ``indices``):
    1. ``(B, L)`` programs count the active rows of each (layer, sequence);
    2. one program turns the counts into ``active_cu_seqlens`` (prefix over sequences) and
       ``offsets`` (prefix over layers);
    3. ``(B, L)`` programs write their rows' indices at ``offsets[l] + active_cu[l, b]`` plus a
       block-wise ``tl.cumsum`` rank, so all (layer, sequence) pairs scan in parallel.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._utils import on_device_of_first_arg
from .specialization import KernelCall

BLOCK = 1024


@triton.jit
def _seq_rows(cu_seqlens):
    """``(layer, start, end)`` of program ``(sequence, layer)``."""
    seq = tl.program_id(0)
    return tl.program_id(1), tl.load(cu_seqlens + seq), tl.load(cu_seqlens + seq + 1)


@triton.jit(do_not_specialize=["num_rows", "num_seqs"])
def _plan_count_kernel(row_mask, cu_seqlens, active_cu, num_rows, num_seqs, BLOCK: tl.constexpr):
    """``active_cu[l, b + 1] = sum(row_mask[l, cu[b]:cu[b + 1]])``.

    ``row_mask`` uint8 ``[L, N]``, ``active_cu`` int32 ``[L, B + 1]``. Grid ``(B, L)``.
    Traffic: reads the mask once (1 B per (layer, row)), writes 4 B per (layer, sequence).
    """
    layer, start, end = _seq_rows(cu_seqlens)
    mask_row = row_mask + layer.to(tl.int64) * num_rows
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for r0 in range(start, end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        acc += tl.load(mask_row + rows, mask=rows < end, other=0).to(tl.int32)
    tl.store(active_cu + layer * (num_seqs + 1) + tl.program_id(0) + 1, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["num_seqs"])
def _plan_scan_kernel(active_cu, offsets, num_layers, num_seqs, BLOCK: tl.constexpr):
    """In place: counts -> ``active_cu[l] = [0, cumsum(counts[l])]``; ``offsets = [0,
    cumsum(layer totals)]`` (int64 ``[L + 1]``). A single program: ``L * B`` is small (it is
    the number of (layer, sequence) pairs, not rows). Traffic: 8 B per pair."""
    layer_start = tl.zeros([], dtype=tl.int64)
    for layer in range(num_layers):
        row = active_cu + layer * (num_seqs + 1)
        tl.store(row, 0)
        running = tl.zeros([], dtype=tl.int32)
        for b0 in range(1, num_seqs + 1, BLOCK):
            idx = b0 + tl.arange(0, BLOCK)
            ok = idx <= num_seqs
            counts = tl.load(row + idx, mask=ok, other=0)
            tl.store(row + idx, tl.cumsum(counts, axis=0) + running, mask=ok)
            running += tl.sum(counts, axis=0)
        tl.store(offsets + layer, layer_start)
        layer_start += running
    tl.store(offsets + num_layers, layer_start)


@triton.jit(do_not_specialize=["num_rows", "num_seqs"])
def _plan_indices_kernel(row_mask, cu_seqlens, active_cu, offsets, indices, num_rows, num_seqs,
                         BLOCK: tl.constexpr):
    """Write the active rows of (layer ``l``, sequence ``b``), ascending, to ``indices`` from
    ``offsets[l] + active_cu[l, b]``. Grid ``(B, L)``; pairs without active rows exit at
    once. Traffic: reads the mask of active pairs once, writes 8 B per active row.
    """
    layer, start, end = _seq_rows(cu_seqlens)
    cu_row = active_cu + layer * (num_seqs + 1) + tl.program_id(0)
    first = tl.load(cu_row)
    if tl.load(cu_row + 1) == first:
        return
    out = indices + tl.load(offsets + layer) + first
    mask_row = row_mask + layer.to(tl.int64) * num_rows
    running = tl.zeros([], dtype=tl.int32)
    for r0 in range(start, end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        active = tl.load(mask_row + rows, mask=rows < end, other=0).to(tl.int32)
        rank = running + tl.cumsum(active, axis=0) - active  # exclusive prefix within the pair
        tl.store(out + rank, rows.to(tl.int64), mask=active != 0)
        running += tl.sum(active, axis=0)


@on_device_of_first_arg
def build_plan(row_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(indices int64 [S], offsets int64 [L + 1], active_cu_seqlens int32 [L, B + 1])``."""
    num_layers, num_rows = row_mask.shape
    num_seqs = cu_seqlens.numel() - 1
    mask = row_mask.contiguous().view(torch.uint8)  # bool pointers are awkward in Triton; same bytes
    cu_seqlens = cu_seqlens.contiguous()
    device = row_mask.device
    active_cu = torch.empty((num_layers, num_seqs + 1), dtype=torch.int32, device=device)
    offsets = torch.empty(num_layers + 1, dtype=torch.int64, device=device)
    pairs = (num_seqs, num_layers)
    if num_seqs and num_layers:
        _plan_count_kernel[pairs](mask, cu_seqlens, active_cu, num_rows, num_seqs, BLOCK=BLOCK)
    _plan_scan_kernel[(1,)](active_cu, offsets, num_layers, num_seqs, BLOCK=BLOCK)
    indices = torch.empty(int(offsets[-1]), dtype=torch.int64, device=device)  # the one host sync
    if indices.numel():
        _plan_indices_kernel[pairs](mask, cu_seqlens, active_cu, offsets, indices, num_rows, num_seqs, BLOCK=BLOCK)
    return indices, offsets, active_cu


def aot_calls(arch: str):
    """The three launches of :func:`build_plan` (one variant each on every arch)."""
    mask = torch.empty((1, 1), dtype=torch.uint8, device="meta")
    int32, int64 = (torch.empty(2, dtype=dtype, device="meta") for dtype in (torch.int32, torch.int64))
    layers, rows, seqs = 12, 100, 3
    block = dict(BLOCK=BLOCK)
    return [KernelCall(_plan_count_kernel, "u8", (mask, int32, int32, rows, seqs), block),
            KernelCall(_plan_scan_kernel, "u8", (int32, int64, layers, seqs), block),
            KernelCall(_plan_indices_kernel, "u8", (mask, int32, int32, int64, int64, rows, seqs), block)]
