"""Row compaction: ``gather_rows`` (``x[index]``) and its inverse ``scatter_rows``."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import aot_spec, check, check_same_device, on_device_of_first_arg, row_blocks
from .gated_scatter import _row_merge_kernel, merge_rows


@triton.jit
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
    check(x.dim() == 2 and index.dim() == 1 and index.dtype == torch.int64, "x must be [N, D], index int64 [M]")
    check_same_device(x, index)
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
    check(y.dim() == 2 and index.shape == (y.shape[0],) and index.dtype == torch.int64,
          "y must be [M, D], index int64 [M]")
    check(y.shape[0] <= num_rows, "more rows to scatter than num_rows")
    check_same_device(y, index)
    return merge_rows(None, y, None, index, int(num_rows))


def aot_specs(backend: Optional[str] = None):
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        block_r, block_d = row_blocks(256)
        specs.append(aot_spec(_gather_rows_kernel, dt, {"x": f"*{dt}", "index": "*i64", "out": f"*{dt}"},
                              {"BLOCK_R": block_r, "BLOCK_D": block_d}))
        specs.append(aot_spec(_row_merge_kernel, f"{dt},scatter", {"y": f"*{dt}", "inverse": "*i32", "out": f"*{dt}"},
                              {"x": None, "gate": None, "HAS_X": False, "HAS_GATE": False, "HAS_INDEX": True,
                               "BLOCK_R": block_r, "BLOCK_D": block_d}))
    return specs

