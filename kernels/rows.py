"""Row ops: the gated residual scatter (forward and backward), ``gather_rows`` (``x[index]``)
and its inverse ``scatter_rows``, which shares the gated scatter's row-merge kernel.

Design: one kernel over all ``N`` output rows. Each row looks up its position in ``index``
through an int32 inverse map (``-1``: untouched row), so every output row is written exactly
once and ``x`` is read once. The alternative, a full copy of ``x`` followed by a kernel over
the ``M`` active rows, re-reads ``x[index]`` and writes ``out[index]`` a second time:
``2 * M * D`` extra elements against ``8 * N + 12 * M`` bytes for the map (see README.md). In the
prefix case (``index=None``) the map is implicit (row ``r < M`` sits at position ``r``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import inverse_index, on_device_of_first_arg, opmath, row_blocks
from .specialization import KernelCall


@triton.jit
def _row_tile(inverse, num_rows, num_active, HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's ``BLOCK_R`` output rows: ``(rows, row_ok, pos, active)`` with ``pos``
    each row's position in ``index`` (-1: row not active)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    if HAS_INDEX:
        pos = tl.load(inverse + rows, mask=row_ok, other=-1)
    else:
        pos = tl.where(rows < num_active, rows, -1)
    return rows, row_ok, pos, pos >= 0


@triton.jit
def _load_gate(gate, pos, active, y):
    """``[BLOCK_R, 1]`` gates, rounded to y's dtype first as the reference does."""
    g = tl.load(gate + pos, mask=active, other=0.0).to(y.dtype.element_ty)
    return g.to(opmath(y.dtype.element_ty))[:, None]


@triton.jit(do_not_specialize=["num_rows", "num_active"])
def _row_merge_kernel(
    x, y, gate, inverse, out, num_rows, num_active, dim,
    HAS_X: tl.constexpr, HAS_GATE: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[r] = x[r] + gate[p] * (y[p] - x[r])`` if row ``r`` sits at position ``p`` of
    ``index``, else ``x[r]``.

    Shapes: ``x``/``out`` ``[N, D]``, ``y`` ``[M, D]``, ``gate`` ``[M]``, ``inverse`` int32
    ``[N]``. ``HAS_GATE=False``: gate 1 (``out[r] = y[p]``, an exact copy, ``x[r]`` not read);
    ``HAS_X=False``: ``x`` is zero (this is ``scatter_rows``); ``HAS_INDEX=False``: prefix,
    ``p = r`` for ``r < M``. Grid: ``cdiv(N, BLOCK_R)``; each program loops over ``dim`` in
    ``BLOCK_D`` chunks. Traffic per element: reads ``x`` once (untouched rows, and active rows
    only when gated), ``y`` once per active row, writes ``out`` once; per row 4 B of
    ``inverse`` and one gate.
    """
    rows, row_ok, pos, active = _row_tile(inverse, num_rows, num_active, HAS_INDEX, BLOCK_R)
    if HAS_GATE:
        g = _load_gate(gate, pos, active, y)
        x_rows = row_ok  # the update reads x[r] of active rows too
    else:
        x_rows = row_ok & ~active  # active rows are replaced by y: skip their x
    out_rows = rows.to(tl.int64)[:, None] * dim
    y_rows = pos.to(tl.int64)[:, None] * dim
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        col_ok = cols < dim
        new = tl.load(y + y_rows + cols, mask=active[:, None] & col_ok, other=0.0)
        if HAS_X:
            old = tl.load(x + out_rows + cols, mask=x_rows[:, None] & col_ok, other=0.0)
            if HAS_GATE:
                old_acc = old.to(g.dtype)
                new = old_acc + g * (new.to(g.dtype) - old_acc)
        else:
            old = tl.zeros([BLOCK_R, BLOCK_D], dtype=y.dtype.element_ty)
        merged = tl.where(active[:, None], new.to(out.dtype.element_ty), old.to(out.dtype.element_ty))
        tl.store(out + out_rows + cols, merged, mask=row_ok[:, None] & col_ok)


@triton.jit(do_not_specialize=["num_rows", "num_active"])
def _gated_scatter_bwd_kernel(
    grad_out, x, y, gate, inverse, grad_x, grad_y, grad_gate, num_rows, num_active, dim,
    HAS_GATE: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of :func:`_row_merge_kernel` (with ``x``), one pass over ``grad_out``.

    For an active row ``r`` at position ``p``: ``grad_x[r] = (1 - gate[p]) * grad_out[r]``
    (0 without gate), ``grad_y[p] = gate[p] * grad_out[r]``,
    ``grad_gate[p] = sum_d grad_out[r] * (y[p] - x[r])`` (accumulated in fp32, fp64 for fp64,
    over the dim loop); other rows: ``grad_x[r] = grad_out[r]``. Shapes as the forward; grid
    ``cdiv(N, BLOCK_R)``. Traffic per element: reads ``grad_out`` once, ``x`` and ``y`` once
    per active row (only when gated), writes ``grad_x`` once and ``grad_y`` once per active
    row; per row 4 B of ``inverse``, one gate read and one ``grad_gate`` write.
    """
    ACC: tl.constexpr = opmath(y.dtype.element_ty)
    rows, row_ok, pos, active = _row_tile(inverse, num_rows, num_active, HAS_INDEX, BLOCK_R)
    if HAS_GATE:
        g = _load_gate(gate, pos, active, y)
    else:
        g = tl.full([BLOCK_R, 1], 1.0, dtype=ACC)
    dot = tl.zeros([BLOCK_R], dtype=ACC)
    out_rows = rows.to(tl.int64)[:, None] * dim
    y_rows = pos.to(tl.int64)[:, None] * dim
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        col_ok = cols < dim
        all_ok = row_ok[:, None] & col_ok
        act_ok = active[:, None] & col_ok
        go = tl.load(grad_out + out_rows + cols, mask=all_ok, other=0.0).to(ACC)
        tl.store(grad_x + out_rows + cols, tl.where(active[:, None], (1.0 - g) * go, go).to(grad_x.dtype.element_ty),
                 mask=all_ok)
        tl.store(grad_y + y_rows + cols, (g * go).to(grad_y.dtype.element_ty), mask=act_ok)
        if HAS_GATE:
            xv = tl.load(x + out_rows + cols, mask=act_ok, other=0.0).to(ACC)
            yv = tl.load(y + y_rows + cols, mask=act_ok, other=0.0).to(ACC)
            dot += tl.sum(go * (yv - xv), axis=1)
    if HAS_GATE:
        tl.store(grad_gate + pos, dot.to(grad_gate.dtype.element_ty), mask=active)


def merge_rows(x: Optional[torch.Tensor], y: torch.Tensor, gate: Optional[torch.Tensor], index: Optional[torch.Tensor],
               num_rows: int) -> torch.Tensor:
    """Launch :func:`_row_merge_kernel`; ``x=None`` means a zero base buffer."""
    out = torch.empty((num_rows, y.shape[1]), dtype=y.dtype if x is None else x.dtype, device=y.device)
    if out.numel() == 0:
        return out
    num_active, dim = y.shape
    block_r, block_d = row_blocks(dim)
    _row_merge_kernel[(triton.cdiv(num_rows, block_r),)](
        x, y.contiguous(), gate, inverse_index(index, num_rows), out, num_rows, num_active, dim,
        HAS_X=x is not None, HAS_GATE=gate is not None, HAS_INDEX=index is not None,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out


@on_device_of_first_arg
def gated_residual_scatter(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor],
                           index: Optional[torch.Tensor]) -> torch.Tensor:
    """``out = x; out[index] = x[index] + gate * (y - x[index])`` (reference: dynenc/ops/rows.py)."""
    return merge_rows(x.contiguous(), y, None if gate is None else gate.contiguous(), index, x.shape[0])


@on_device_of_first_arg
def gated_residual_scatter_backward(grad_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                    gate: Optional[torch.Tensor], index: Optional[torch.Tensor]
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(grad_x [N, D], grad_y [M, D], grad_gate [M])``; ``grad_gate`` is zeros without gate."""
    (num_rows, dim), num_active = x.shape, y.shape[0]
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_y = torch.empty_like(y, memory_format=torch.contiguous_format)
    if gate is None:
        grad_gate = torch.zeros(num_active, dtype=x.dtype, device=x.device)
    else:
        gate = gate.contiguous()
        grad_gate = torch.empty_like(gate)
    if grad_x.numel():
        block_r, block_d = row_blocks(dim)
        _gated_scatter_bwd_kernel[(triton.cdiv(num_rows, block_r),)](
            grad_out.contiguous(), x.contiguous(), y.contiguous(), gate, inverse_index(index, num_rows),
            grad_x, grad_y, grad_gate, num_rows, num_active, dim,
            HAS_GATE=gate is not None, HAS_INDEX=index is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return grad_x, grad_y, grad_gate


@triton.jit(do_not_specialize=["num_out"])
def _gather_rows_kernel(x, index, out, num_out, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[i] = x[index[i]]``; ``x`` ``[N, D]``, ``index`` int64 ``[M]``, ``out`` ``[M, D]``.

    Grid ``cdiv(M, BLOCK_R)``, dim loop inside. Traffic per element: reads ``x[index]`` once,
    writes ``out`` once; 8 B of ``index`` per row.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_out
    src_rows = tl.load(index + rows, mask=row_ok, other=0)[:, None] * dim
    out_rows = rows.to(tl.int64)[:, None] * dim
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        ok = row_ok[:, None] & (cols < dim)
        tl.store(out + out_rows + cols, tl.load(x + src_rows + cols, mask=ok), mask=ok)


@on_device_of_first_arg
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]``: ``[N, D]`` -> ``[M, D]``."""
    out = torch.empty((index.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    if out.numel():
        block_r, block_d = row_blocks(x.shape[1])
        _gather_rows_kernel[(triton.cdiv(out.shape[0], block_r),)](
            x.contiguous(), index.contiguous(), out, out.shape[0], x.shape[1], BLOCK_R=block_r, BLOCK_D=block_d)
    return out


@on_device_of_first_arg
def scatter_rows(y: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out = zeros([num_rows, D]); out[index] = y``.

    Runs the row-merge kernel of gated_scatter with a zero base and no gate: every output row
    is written once (zero or ``y[p]``), instead of a zero fill followed by a scatter that
    writes the active rows twice.
    """
    return merge_rows(None, y, None, index, int(num_rows))


AOT_DIM = 256  # a Conformer width; dim is specialised (% 16) like any model constant


def aot_calls(arch: str):
    """The launches of every launcher above, per dtype: gather, scatter (no base, no gate),
    gated scatter with an index, ungated prefix scatter, and the gated backward."""
    calls = []
    blocks = dict(zip(("BLOCK_R", "BLOCK_D"), row_blocks(AOT_DIM)))
    inverse = torch.empty(1, dtype=torch.int32, device="meta")
    index = torch.empty(1, dtype=torch.int64, device="meta")
    sizes = (100, 40, AOT_DIM)  # num_rows, num_active, dim
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.empty((1, AOT_DIM), dtype=dtype, device="meta")
        variant = str(dtype).removeprefix("torch.")

        def merge(name, x, gate, index_map):
            return KernelCall(_row_merge_kernel, f"{variant},{name}", (x, t, gate, index_map, t, *sizes),
                              dict(HAS_X=x is not None, HAS_GATE=gate is not None, HAS_INDEX=index_map is not None,
                                   **blocks))

        calls += [
            KernelCall(_gather_rows_kernel, variant, (t, index, t, 40, AOT_DIM), blocks),
            merge("scatter", None, None, inverse),
            merge("gate,index", t, t, inverse),
            merge("prefix", t, None, None),
            KernelCall(_gated_scatter_bwd_kernel, f"{variant},gate,index", (t, t, t, t, inverse, t, t, t, *sizes),
                       dict(HAS_GATE=True, HAS_INDEX=True, **blocks)),
        ]
    return calls
