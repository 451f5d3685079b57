"""The one op registry: every ``dynenc::`` op with its backends.

Schemas and CPU kernels come from the C++ extension (``csrc/``, loaded as ``dynenc._C``);
this file adds the CUDA kernels (Triton, ``dynenc.kernels``), fake implementations (for
``torch.compile``) and autograd formulas. Backward passes are ops too, with their own
C++/Triton kernels.

Modules call the functions below, never a backend. The backend is chosen per call site
with :func:`use_backend`:

* ``"native"`` (default): ``torch.ops.dynenc.*`` — C++ on CPU tensors, Triton on CUDA tensors.
  There is no silent fallback: a device with no kernel raises.
* ``"reference"``: the plain-PyTorch oracles of :mod:`dynenc.reference` (autograd by torch).

Dtypes: float32/float64 everywhere; bfloat16/float16 on CPU (C++, fp32 accumulation) and on
CUDA (Triton, fp32 accumulation; fp16/bf16 under autocast come in as such).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import _C  # noqa: F401  (registers the dynenc:: schemas and CPU kernels)
from . import reference

_BACKENDS = ("native", "reference")
_backend = "native"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed dynenc ops on backend ``name`` (``"native"`` or ``"reference"``)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def current_backend() -> str:
    return _backend


def _native() -> bool:
    return _backend == "native"


# ----------------------------------------------------------------------------- CUDA kernels
def _triton(name: str):
    def launch(*args):
        from . import kernels  # imported on first CUDA call: triton is not needed on CPU

        return getattr(kernels, name)(*args)

    return launch


for _op in (
    "gated_residual_scatter",
    "gated_residual_scatter_backward",
    "gather_rows",
    "scatter_rows",
    "varlen_dwconv1d",
    "varlen_dwconv1d_backward",
    "varlen_attention",
    "varlen_attention_backward",
    "build_plan",
):
    torch.library.register_kernel(f"dynenc::{_op}", "cuda", _triton(_op))


# ----------------------------------------------------------------------------- fake impls
@torch.library.register_fake("dynenc::gated_residual_scatter")
def _(x, y, gate, index):
    return torch.empty_like(x)


@torch.library.register_fake("dynenc::gated_residual_scatter_backward")
def _(grad_out, x, y, gate, index):
    return torch.empty_like(x), torch.empty_like(y), (x if gate is None else gate).new_empty(y.shape[0])


@torch.library.register_fake("dynenc::gather_rows")
def _(x, index):
    return x.new_empty((index.shape[0], x.shape[1]))


@torch.library.register_fake("dynenc::scatter_rows")
def _(y, index, num_rows):
    return y.new_empty((num_rows, y.shape[1]))


@torch.library.register_fake("dynenc::varlen_dwconv1d")
def _(x, cu_seqlens, weight, bias):
    return torch.empty_like(x)


@torch.library.register_fake("dynenc::varlen_dwconv1d_backward")
def _(grad_out, x, cu_seqlens, weight):
    return torch.empty_like(x), torch.empty_like(weight), x.new_empty(weight.shape[0])


@torch.library.register_fake("dynenc::varlen_attention")
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("dynenc::varlen_attention_backward")
def _(grad_out, q, k, v, out, logsumexp, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("dynenc::build_plan")
def _(row_mask, cu_seqlens):
    total = torch.library.get_ctx().new_dynamic_size()
    num_layers = row_mask.shape[0]
    return (
        row_mask.new_empty(total, dtype=torch.int64),
        row_mask.new_empty(num_layers + 1, dtype=torch.int64),
        cu_seqlens.new_empty((num_layers, cu_seqlens.shape[0])),
    )


# ----------------------------------------------------------------------------- autograd
def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))
    ctx.is_tensor = [isinstance(t, Tensor) for t in inputs]
    ctx.non_tensor = [t for t in inputs if not isinstance(t, Tensor)]


def _saved(ctx):
    """The forward's inputs in order, None for absent optional tensors."""
    tensors = iter(ctx.saved_tensors)
    others = iter(ctx.non_tensor)
    return [next(tensors) if is_tensor else next(others) for is_tensor in ctx.is_tensor]


def _gated_scatter_setup(ctx, inputs, output):
    x, y, gate, index = inputs
    ctx.num_active = y.shape[0]
    if gate is None:
        # A hard gate needs neither x nor y in backward: keep only the index (saves 2 buffers
        # per layer of activation memory in layer-dropping training).
        ctx.save_for_backward(index)
        ctx.hard = True
    else:
        _save_inputs(ctx, inputs, output)
        ctx.hard = False


def _gated_scatter_backward(ctx, grad_out):
    if ctx.hard:
        (index,) = ctx.saved_tensors
        grad_y = grad_out[: ctx.num_active] if index is None else torch.ops.dynenc.gather_rows(grad_out, index)
        # grad_x = grad_out with the replaced rows zeroed: the same fused op with y = 0.
        zeros = grad_out.new_zeros(ctx.num_active, grad_out.shape[1])
        return torch.ops.dynenc.gated_residual_scatter(grad_out, zeros, None, index), grad_y, None, None
    x, y, gate, index = _saved(ctx)
    grad_x, grad_y, grad_gate = torch.ops.dynenc.gated_residual_scatter_backward(grad_out, x, y, gate, index)
    return grad_x, grad_y, grad_gate, None


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.num_rows = x.shape[0]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.dynenc.scatter_rows(grad, index, ctx.num_rows), None


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.dynenc.gather_rows(grad, index), None, None


def _dwconv_backward(ctx, grad_out):
    x, cu_seqlens, weight, bias = _saved(ctx)
    grad_x, grad_w, grad_b = torch.ops.dynenc.varlen_dwconv1d_backward(grad_out, x, cu_seqlens, weight)
    return grad_x, None, grad_w, (grad_b if bias is not None else None)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, logsumexp = output
    ctx.save_for_backward(q, k, v, out, logsumexp, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(logsumexp)


def _attention_backward(ctx, grad_out, _grad_logsumexp):
    q, k, v, out, logsumexp, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.dynenc.varlen_attention_backward(
        grad_out.contiguous(), q, k, v, out, logsumexp, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return (*grads, None, None, None)


torch.library.register_autograd("dynenc::gated_residual_scatter", _gated_scatter_backward,
                                setup_context=_gated_scatter_setup)
torch.library.register_autograd("dynenc::gather_rows", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("dynenc::scatter_rows", _scatter_backward, setup_context=_scatter_setup)
torch.library.register_autograd("dynenc::varlen_dwconv1d", _dwconv_backward, setup_context=_save_inputs)
torch.library.register_autograd("dynenc::varlen_attention", _attention_backward, setup_context=_attention_setup)


# ----------------------------------------------------------------------------- public API
# Shape checks use guard_or_false: under torch.compile row counts are data-dependent, and a
# check that cannot be decided at trace time is left to the kernels' own checks.
def _check_rows(name: str, t: Tensor, like: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(t.shape)}")
    if guard_or_false(t.shape[1] != like.shape[1]) or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must match x in features/dtype/device: got {tuple(t.shape)} {t.dtype} {t.device}, "
            f"x is {tuple(like.shape)} {like.dtype} {like.device}"
        )


def _check_index(index: Tensor, length: Optional[int], device: torch.device) -> None:
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} shape {tuple(index.shape)}")
    if length is not None and guard_or_false(index.shape[0] != length):
        raise ValueError(f"index must have {length} entries (one per active row), got {index.shape[0]}")
    if index.device != device:
        raise ValueError(f"index must be on {device}, got {index.device}")


def gated_residual_scatter(x: Tensor, y: Tensor, gate: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Tensor:
    """``out = x; out[index] = x[index] + gate * (y - x[index])`` in one fused pass.

    Args:
        x: ``[N, D]`` packed layer input.
        y: ``[M, D]`` block output of the active rows.
        gate: ``[M]`` per-row gate or None (= 1, plain replacement).
        index: int64 ``[M]`` distinct active rows, or None for the prefix ``0..M-1``.
    Returns:
        ``[N, D]``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, features], got shape {tuple(x.shape)}")
    _check_rows("y", y, x)
    if guard_or_false(y.shape[0] > x.shape[0]):
        raise ValueError(f"y has {y.shape[0]} rows but x only {x.shape[0]}")
    if gate is not None and (gate.dim() != 1 or guard_or_false(gate.shape[0] != y.shape[0])):
        raise ValueError(f"gate must be 1-D with {y.shape[0]} entries, got shape {tuple(gate.shape)}")
    if index is not None:
        _check_index(index, y.shape[0], x.device)
    if gate is not None:
        gate = gate.to(x.dtype)
    if not _native():
        return reference.gated_residual_scatter(x, y, gate, index)
    return torch.ops.dynenc.gated_residual_scatter(x, y, gate, index)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]``: ``[N, D]`` -> ``[M, D]`` (backward scatters into zeros)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, features], got shape {tuple(x.shape)}")
    _check_index(index, None, x.device)
    if not _native():
        return reference.gather_rows(x, index)
    return torch.ops.dynenc.gather_rows(x, index)


def scatter_rows(y: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """``out = zeros([num_rows, D]); out[index] = y`` (backward gathers)."""
    if y.dim() != 2:
        raise ValueError(f"y must be 2-D [rows, features], got shape {tuple(y.shape)}")
    _check_index(index, y.shape[0], y.device)
    if not _native():
        return reference.scatter_rows(y, index, num_rows)
    return torch.ops.dynenc.scatter_rows(y, index, num_rows)


def _check_cu_seqlens(cu_seqlens: Tensor, device: torch.device) -> None:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a non-empty 1-D int32 tensor, got {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device}, got {cu_seqlens.device}")


def varlen_dwconv1d(x: Tensor, cu_seqlens: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Depthwise 'same' conv1d over packed sequences (zero padding at each sequence edge).

    Args:
        x: ``[N, C]`` packed, channels last.
        cu_seqlens: int32 ``[B + 1]``.
        weight: ``[C, K]``, K odd.
        bias: ``[C]`` or None.
    Returns:
        ``[N, C]``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, channels], got shape {tuple(x.shape)}")
    _check_cu_seqlens(cu_seqlens, x.device)
    if weight.dim() != 2 or guard_or_false(weight.shape[0] != x.shape[1]) or weight.shape[1] % 2 != 1:
        raise ValueError(f"weight must be [C={x.shape[1]}, K] with K odd, got shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or guard_or_false(bias.shape[0] != x.shape[1])):
        raise ValueError(f"bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    if not _native():
        return reference.varlen_dwconv1d(x, cu_seqlens, weight, bias)
    return torch.ops.dynenc.varlen_dwconv1d(x, cu_seqlens, weight, bias)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: Optional[float] = None
) -> Tensor:
    """Block-diagonal softmax attention over packed sequences.

    Args:
        q, k, v: ``[N, H, Dh]``.
        cu_seqlens: int32 ``[B + 1]``.
        max_seqlen: an upper bound of the longest sequence (host int; sizes GPU grids).
        scale: softmax scale, default ``1 / sqrt(Dh)``.
    Returns:
        ``[N, H, Dh]``.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [rows, heads, head_dim], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or any(guard_or_false(a != b) for a, b in zip(t.shape, q.shape)) or t.dtype != q.dtype \
                or t.device != q.device:
            raise ValueError(f"{name} must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got {tuple(t.shape)}")
    _check_cu_seqlens(cu_seqlens, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not _native():
        return reference.varlen_attention(q, k, v, cu_seqlens, scale)
    return torch.ops.dynenc.varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), scale)[0]


def build_plan(row_mask: Tensor, cu_seqlens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-layer active rows + active ``cu_seqlens`` from a bool ``[L, N]`` row mask.

    Returns ``(indices int64 [S], offsets int64 [L + 1], active_cu_seqlens int32 [L, B + 1])``;
    see :func:`dynenc.reference.build_plan`.
    """
    if row_mask.dtype != torch.bool or row_mask.dim() != 2:
        raise ValueError(f"row_mask must be a 2-D bool tensor [layers, rows], got {row_mask.dtype} {tuple(row_mask.shape)}")
    _check_cu_seqlens(cu_seqlens, row_mask.device)
    if not _native():
        return reference.build_plan(row_mask, cu_seqlens)
    return torch.ops.dynenc.build_plan(row_mask, cu_seqlens)
