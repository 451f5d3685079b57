"""Row ops on packed buffers: the fused gated residual scatter, and row gather / scatter.

A packed buffer is ``x [N, D]``: the valid frames of every sequence, back to back. An
``index`` is an int64 vector of distinct rows of it; ``index=None`` means the prefix
``0..M-1`` (the case of samples sorted by depth).

Example::

    >>> x = torch.randn(5, 4)
    >>> index = torch.tensor([1, 3])
    >>> y = dynenc.ops.gather_rows(x, index) * 2                       # [2, 4]
    >>> out = dynenc.ops.gated_residual_scatter(x, y, None, index)    # rows 1, 3 replaced
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import validation as V
from .registry import autocast, dispatch, refuse_double_backward, register_autocast, register_cuda

__all__ = ["gated_residual_scatter", "gather_rows", "scatter_rows"]


def sequence_ids(cu_seqlens: Tensor, num_rows: int) -> Tensor:
    """int64 ``[num_rows]``: the sequence each packed row belongs to (``cu_seqlens`` int32
    ``[B + 1]``). Not an op: the one definition the references and the routing share."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=num_rows
    )


# ----------------------------------------------------------------------------- references
def reference_gated_residual_scatter(x: Tensor, y: Tensor, gate: Optional[Tensor], index: Optional[Tensor]) -> Tensor:
    """``out = x; out[index] = x[index] + gate * (y - x[index])`` in plain PyTorch."""
    out = x.clone()
    rows = out[: y.shape[0]] if index is None else x.index_select(0, index)
    new = y if gate is None else rows + gate.unsqueeze(-1).to(y.dtype) * (y - rows)
    if index is None:
        out[: y.shape[0]] = new
    else:
        out.index_copy_(0, index, new)
    return out


def reference_gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]``."""
    return x.index_select(0, index)


def reference_scatter_rows(y: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """``out = zeros([num_rows, D]); out[index] = y``."""
    out = y.new_zeros((num_rows, y.shape[1]))
    out.index_copy_(0, index, y)
    return out


# ----------------------------------------------------------------------------- validation
def check_gated_residual_scatter(x: Tensor, y: Tensor, gate: Optional[Tensor], index: Optional[Tensor]) -> None:
    V.check_tensor("x", x, dim=2, layout="[rows, features]", dtypes=V.FLOATING)
    V.check_like("y", y, "x", x, dims=(1,))
    if guard_or_false(y.shape[0] > x.shape[0]):
        raise ValueError(f"y must have at most x's {x.shape[0]} rows, got {y.shape[0]}")
    if gate is not None:
        V.check_tensor("gate", gate, dim=1, layout="[active rows]", dtypes=V.FLOATING, device=x.device)
        if guard_or_false(gate.shape[0] != y.shape[0]):
            raise ValueError(f"gate must have {y.shape[0]} entries (one per row of y), got {gate.shape[0]}")
    if index is not None:
        V.check_index("index", index, x.device, y.shape[0])


def check_gated_residual_scatter_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, gate: Optional[Tensor], index: Optional[Tensor]
) -> None:
    check_gated_residual_scatter(x, y, gate, index)
    V.check_like("grad_out", grad_out, "x", x, dims=(0, 1))


def check_gather_rows(x: Tensor, index: Tensor) -> None:
    V.check_tensor("x", x, dim=2, layout="[rows, features]", dtypes=V.FLOATING)
    V.check_index("index", index, x.device)


def check_scatter_rows(y: Tensor, index: Tensor, num_rows: int) -> None:
    V.check_tensor("y", y, dim=2, layout="[rows, features]", dtypes=V.FLOATING)
    V.check_index("index", index, y.device, y.shape[0])
    V.check_int("num_rows", num_rows, low=0)
    if guard_or_false(y.shape[0] > num_rows):
        raise ValueError(f"num_rows must be >= the {y.shape[0]} rows of y, got {num_rows}")
    V.check_allocation("num_rows", num_rows, y.shape[1] * y.element_size(), y.device)


def check_values_gated_residual_scatter(x: Tensor, y: Tensor, gate: Optional[Tensor], index: Optional[Tensor]) -> None:
    if index is not None:
        V.check_index_values("index", index, x.shape[0], distinct=True)


def check_values_gated_residual_scatter_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, gate: Optional[Tensor], index: Optional[Tensor]
) -> None:
    check_values_gated_residual_scatter(x, y, gate, index)


def check_values_gather_rows(x: Tensor, index: Tensor) -> None:
    V.check_index_values("index", index, x.shape[0], distinct=False)


def check_values_scatter_rows(y: Tensor, index: Tensor, num_rows: int) -> None:
    V.check_index_values("index", index, num_rows, distinct=True)


# ----------------------------------------------------------------------------- registration
register_cuda("gated_residual_scatter", check_gated_residual_scatter, check_values_gated_residual_scatter)
register_cuda(
    "gated_residual_scatter_backward",
    check_gated_residual_scatter_backward,
    check_values_gated_residual_scatter_backward,
)
register_cuda("gather_rows", check_gather_rows, check_values_gather_rows)
register_cuda("scatter_rows", check_scatter_rows, check_values_scatter_rows)
refuse_double_backward("gated_residual_scatter_backward")
register_autocast("gated_residual_scatter", "promote")
register_autocast("gather_rows", "promote")
register_autocast("scatter_rows", "promote")


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


def _gated_scatter_setup(ctx, inputs, output):
    x, y, gate, index = inputs
    ctx.num_active = y.shape[0]
    ctx.hard = gate is None
    # A hard gate needs neither x nor y in backward: keep only the index (saves 2 buffers per
    # layer of activation memory in layer-dropping training).
    ctx.save_for_backward(index) if ctx.hard else ctx.save_for_backward(x, y, gate, index)


def _gated_scatter_backward(ctx, grad_out):
    if ctx.hard:
        (index,) = ctx.saved_tensors
        grad_y = grad_out[: ctx.num_active] if index is None else torch.ops.dynenc.gather_rows(grad_out, index)
        # grad_x = grad_out with the replaced rows zeroed: the same fused op with y = 0.
        zeros = grad_out.new_zeros(ctx.num_active, grad_out.shape[1])
        return torch.ops.dynenc.gated_residual_scatter(grad_out, zeros, None, index), grad_y, None, None
    x, y, gate, index = ctx.saved_tensors
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


torch.library.register_autograd(
    "dynenc::gated_residual_scatter", _gated_scatter_backward, setup_context=_gated_scatter_setup
)
torch.library.register_autograd("dynenc::gather_rows", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("dynenc::scatter_rows", _scatter_backward, setup_context=_scatter_setup)


# ----------------------------------------------------------------------------- public API
def gated_residual_scatter(
    x: Tensor, y: Tensor, gate: Optional[Tensor] = None, index: Optional[Tensor] = None
) -> Tensor:
    """``out = x; out[index] = x[index] + gate * (y - x[index])`` in one fused pass.

    Args:
        x: ``[N, D]`` packed layer input.
        y: ``[M, D]`` block output of the active rows (x's dtype and device).
        gate: ``[M]`` per-row gate (hard 0/1 or soft), or None (= 1, plain replacement).
        index: int64 ``[M]`` distinct active rows, or None for the prefix ``0..M-1``.
    Returns:
        ``[N, D]``; rows not in ``index`` equal ``x``.
    """
    x, y = autocast("promote", x, y)
    check_gated_residual_scatter(x, y, gate, index)
    if gate is not None:
        gate = gate.to(x.dtype)
    return dispatch(
        "gated_residual_scatter",
        reference_gated_residual_scatter,
        check_values_gated_residual_scatter,
        x,
        y,
        gate,
        index,
    )


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Compact the active rows: ``x[index]``, ``[N, D]`` -> ``[M, D]`` (backward scatters into zeros).

    Args:
        x: ``[N, D]``.
        index: int64 ``[M]`` rows of ``x`` in ``[0, N)``.
    """
    check_gather_rows(x, index)
    return dispatch("gather_rows", reference_gather_rows, check_values_gather_rows, x, index)


def scatter_rows(y: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Inverse of :func:`gather_rows`: ``out = zeros([num_rows, D]); out[index] = y`` (backward gathers).

    Args:
        y: ``[M, D]``.
        index: int64 ``[M]`` distinct rows in ``[0, num_rows)``.
        num_rows: N.
    """
    check_scatter_rows(y, index, num_rows)
    return dispatch("scatter_rows", reference_scatter_rows, check_values_scatter_rows, y, index, num_rows)
