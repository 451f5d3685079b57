"""Depthwise 'same' conv1d over packed sequences (the Conformer convolution module's
depthwise conv): zero padding at each sequence edge, never across sequences.

Example::

    >>> x = torch.randn(7, 8)                                   # two sequences: 3 + 4 frames
    >>> cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> weight, bias = torch.randn(8, 5), torch.randn(8)        # Conv1d(groups=8).weight[:, 0, :]
    >>> out = dynenc.ops.varlen_dwconv1d(x, cu_seqlens, weight, bias)   # [7, 8]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import validation as V
from .registry import autocast, dispatch, refuse_double_backward, register_autocast, register_cuda
from .rows import sequence_ids

__all__ = ["varlen_dwconv1d"]


def reference_varlen_dwconv1d(x: Tensor, cu_seqlens: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out[t, c] = bias[c] + sum_k weight[c, k] * x[t + k - (K - 1) // 2, c]``, the input row
    taken as zero when it falls outside ``t``'s own sequence."""
    num_rows, _ = x.shape
    kernel_size = weight.shape[1]
    pad = (kernel_size - 1) // 2
    seq = sequence_ids(cu_seqlens, num_rows)
    rows = torch.arange(num_rows, device=x.device)
    out = torch.zeros_like(x) if bias is None else bias.expand_as(x).clone()
    for k in range(kernel_size):
        src = rows + (k - pad)
        valid = (src >= 0) & (src < num_rows)
        src_c = src.clamp(0, max(num_rows - 1, 0))
        valid = valid & (seq.index_select(0, src_c) == seq)
        out = out + torch.where(valid.unsqueeze(-1), x.index_select(0, src_c), 0.0) * weight[:, k]
    return out


def check_varlen_dwconv1d(x: Tensor, cu_seqlens: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    V.check_tensor("x", x, dim=2, layout="[rows, channels]", dtypes=V.FLOATING)
    V.check_cu_seqlens(cu_seqlens, x.device)
    V.check_tensor("weight", weight, dim=2, layout="[channels, kernel_size]", dtypes=V.FLOATING, device=x.device)
    if guard_or_false(weight.shape[0] != x.shape[1]) or weight.shape[1] % 2 != 1:
        raise ValueError(f"weight must be [C={x.shape[1]}, K] with K odd, got shape {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias, dim=1, layout="[channels]", dtypes=V.FLOATING, device=x.device)
        if guard_or_false(bias.shape[0] != x.shape[1]):
            raise ValueError(f"bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")


def check_varlen_dwconv1d_backward(grad_out: Tensor, x: Tensor, cu_seqlens: Tensor, weight: Tensor) -> None:
    check_varlen_dwconv1d(x, cu_seqlens, weight, None)
    V.check_like("grad_out", grad_out, "x", x, dims=(0, 1))


def check_values_varlen_dwconv1d(x: Tensor, cu_seqlens: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    V.check_cu_seqlens_values(cu_seqlens, x.shape[0])


def check_values_varlen_dwconv1d_backward(grad_out: Tensor, x: Tensor, cu_seqlens: Tensor, weight: Tensor) -> None:
    V.check_cu_seqlens_values(cu_seqlens, x.shape[0])


register_cuda("varlen_dwconv1d", check_varlen_dwconv1d, check_values_varlen_dwconv1d)
register_cuda("varlen_dwconv1d_backward", check_varlen_dwconv1d_backward, check_values_varlen_dwconv1d_backward)
refuse_double_backward("varlen_dwconv1d_backward")
register_autocast("varlen_dwconv1d", "lower")


@torch.library.register_fake("dynenc::varlen_dwconv1d")
def _(x, cu_seqlens, weight, bias):
    return torch.empty_like(x)


@torch.library.register_fake("dynenc::varlen_dwconv1d_backward")
def _(grad_out, x, cu_seqlens, weight):
    return torch.empty_like(x), torch.empty_like(weight), x.new_empty(weight.shape[0])


def _setup(ctx, inputs, output):
    x, cu_seqlens, weight, bias = inputs
    ctx.save_for_backward(x, cu_seqlens, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, cu_seqlens, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.dynenc.varlen_dwconv1d_backward(grad_out, x, cu_seqlens, weight)
    return grad_x, None, grad_w, (grad_b if ctx.has_bias else None)


torch.library.register_autograd("dynenc::varlen_dwconv1d", _backward, setup_context=_setup)


def varlen_dwconv1d(x: Tensor, cu_seqlens: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Depthwise 'same' conv1d over packed sequences (zero padding at each sequence edge).

    Args:
        x: ``[N, C]`` packed, channels last.
        cu_seqlens: int32 ``[B + 1]``, ``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[-1] = N``.
        weight: ``[C, K]``, K odd (``Conv1d(groups=C).weight[:, 0, :]``).
        bias: ``[C]`` or None.
    Returns:
        ``[N, C]``.
    """
    x, cu_seqlens, weight, bias = autocast("lower", x, cu_seqlens, weight, bias)
    check_varlen_dwconv1d(x, cu_seqlens, weight, bias)
    return dispatch(
        "varlen_dwconv1d", reference_varlen_dwconv1d, check_values_varlen_dwconv1d, x, cu_seqlens, weight, bias
    )
