"""Helpers shared by the Triton kernels: segment search, inverse index, launch plumbing."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .specialization import KernelCall

# Tile size (elements) of the memory-bound row kernels: 32 elements in flight per thread with
# the default 4 warps, enough to cover DRAM latency without spilling.
ROW_TILE = 4096
MAX_BLOCK_D = 512


def row_blocks(dim: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for kernels that stream ``[rows, dim]`` tiles, looping over dim."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), MAX_BLOCK_D)
    return ROW_TILE // block_d, block_d


def search_steps(num_segments: int) -> int:
    """Bisection steps of :func:`find_segment` over ``num_segments`` segments."""
    return max(num_segments, 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    if torch.version.hip:
        return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def device_arch(t: torch.Tensor) -> Optional[str]:
    """The arch a launch on ``t``'s device compiles for (``"sm_86"``, ``"gfx90a"``); ``None``
    for CPU tensors (the interpreter). Launch configs are chosen per arch from it, and the AOT
    report passes each target's arch to the same selection functions."""
    if not t.is_cuda:
        return None
    return _cuda_arch(t.device.index if t.device.index is not None else torch.cuda.current_device())


def sm_version(arch: Optional[str]) -> int:
    """Compute capability as an int (``"sm_86"`` -> 86); 0 for AMD and the interpreter."""
    return int(arch[3:]) if arch and arch.startswith("sm_") else 0


def on_device_of_first_arg(fn):
    """Run a launcher with its first tensor's CUDA device current (Triton launches on the
    current device); a no-op for CPU tensors, so launchers also work under TRITON_INTERPRET."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        guard = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with guard:
            return fn(first, *args, **kwargs)

    return wrapper


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Host-side twin of :func:`opmath` (for buffers of partial sums)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.constexpr_function
def opmath(dtype):
    """Arithmetic dtype for an element type (as ``at::opmath_type``): fp64 stays, the rest is
    fp32, so fp16/bf16 are computed and reduced in fp32."""
    return tl.float64 if dtype == tl.float64 else tl.float32


@triton.jit
def find_segment(bounds, value, num_segments, num_steps):
    """Largest ``b`` in ``[0, num_segments)`` with ``bounds[b] <= value``.

    ``bounds`` is an ascending int32 vector of ``num_segments + 1`` entries with
    ``bounds[0] = 0`` (``cu_seqlens``-like, empty segments allowed); ``value`` is a scalar or
    a block. Bisection keeps ``bounds[lo] <= value < bounds[hi]``, so empty segments are
    skipped; ``num_steps = search_steps(num_segments)`` narrows ``hi - lo`` to 1. Every load
    is in bounds even for out-of-range values (they land on the last segment), so callers
    only mask their own accesses.
    """
    lo = value * 0
    hi = lo + num_segments
    for _ in range(num_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(bounds + mid) <= value
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit(do_not_specialize=["num_index"])
def _inverse_index_kernel(index, inverse, num_index, BLOCK: tl.constexpr):
    """``inverse[index[i]] = i`` for ``i < num_index`` (``index`` int64 ``[M]``, ``inverse``
    int32 ``[N]`` prefilled with -1). Traffic: reads 8 B and writes 4 B per index entry."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_index
    rows = tl.load(index + offs, mask=ok, other=0)
    tl.store(inverse + rows, offs, mask=ok)


INVERSE_BLOCK = 1024


def inverse_index(index: Optional[torch.Tensor], num_rows: int) -> Optional[torch.Tensor]:
    """int32 ``[num_rows]`` map from a row to its position in ``index`` (-1 when absent).

    Lets the row kernels visit every output row exactly once (copy or update) instead of a
    full copy followed by an overwrite of the active rows. ``None`` stays ``None`` (prefix).
    """
    if index is None:
        return None
    inverse = torch.full((num_rows,), -1, dtype=torch.int32, device=index.device)
    if index.numel():
        grid = (triton.cdiv(index.numel(), INVERSE_BLOCK),)
        _inverse_index_kernel[grid](index, inverse, index.numel(), BLOCK=INVERSE_BLOCK)
    return inverse


def aot_calls(arch: str):
    """The launch of :func:`inverse_index` (one variant on every arch)."""
    index = torch.empty(1, dtype=torch.int64, device="meta")
    inverse = torch.empty(1, dtype=torch.int32, device="meta")
    return [KernelCall(_inverse_index_kernel, "i64", (index, inverse, 3), dict(BLOCK=INVERSE_BLOCK))]
