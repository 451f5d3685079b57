"""Residual add fused with the LayerNorm of the sum, on packed rows: what every residual
connection of a Conformer block is followed by (the next block's input norm, or the layer's
final norm), in one pass instead of an add and a norm.

Shapes: ``x``, ``residual`` ``[N, D]`` (any ``N >= 0``), ``weight``, ``bias`` ``[D]`` or None;
returns ``(sum [N, D], normed [N, D])`` with ``sum = x + alpha * residual`` and ``normed`` its
LayerNorm over the last dim (``nn.LayerNorm(D)``'s numerics: biased variance, ``eps`` inside
the square root, statistics in fp32, fp64 for fp64 inputs).

Example::

    >>> x, block_out = torch.randn(7, 16), torch.randn(7, 16)
    >>> norm = torch.nn.LayerNorm(16)
    >>> x, h = dynenc.ops.add_layer_norm(x, block_out, 0.5, norm.weight, norm.bias, norm.eps)
    >>> # x == x_old + 0.5 * block_out, h == norm(x)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import validation as V
from .registry import autocast, native, refuse_double_backward, register_autocast, register_cuda

__all__ = ["add_layer_norm"]

#: Widest rows of the CUDA (Triton) kernels, which keep whole rows in registers.
MAX_CUDA_FEATURES = 8192


# ----------------------------------------------------------------------------- reference
def reference_add_layer_norm(
    x: Tensor, residual: Tensor, alpha: float, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor]:
    """``s = x + alpha * residual; (s, F.layer_norm(s, (D,), weight, bias, eps))`` in plain PyTorch."""
    s = x + alpha * residual
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------- validation
def _stat_dtype(t: Tensor) -> torch.dtype:
    """dtype of the per-row mean / rstd: opmath (fp64 for fp64, else fp32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_features(name: str, value: Tensor) -> None:
    if guard_or_false(value.shape[1] < 1):
        raise ValueError(f"{name} must have at least one feature (D >= 1), got shape {tuple(value.shape)}")


def _check_param(name: str, value: Optional[Tensor], x: Tensor) -> None:
    if value is None:
        return
    V.check_tensor(name, value, dim=1, layout="[features]", dtypes=(x.dtype,), device=x.device)
    if guard_or_false(value.shape[0] != x.shape[1]):
        raise ValueError(
            f"{name} must have shape ({x.shape[1]},) (one entry per feature of x), got {tuple(value.shape)}"
        )


def check_add_layer_norm(
    x: Tensor, residual: Tensor, alpha: float, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> None:
    V.check_tensor("x", x, dim=2, layout="[rows, features]", dtypes=V.FLOATING)
    _check_features("x", x)
    V.check_like("residual", residual, "x", x, dims=(0, 1))
    V.check_real("alpha", alpha)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    V.check_real("eps", eps, low=0)


def check_add_layer_norm_backward(
    grad_out: Tensor,
    grad_sum: Optional[Tensor],
    sum: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    alpha: float,
) -> None:
    V.check_tensor("sum", sum, dim=2, layout="[rows, features]", dtypes=V.FLOATING)
    _check_features("sum", sum)
    V.check_like("grad_out", grad_out, "sum", sum, dims=(0, 1))
    if grad_sum is not None:
        V.check_like("grad_sum", grad_sum, "sum", sum, dims=(0, 1))
    for name, stat in (("mean", mean), ("rstd", rstd)):
        V.check_tensor(name, stat, dim=1, layout="[rows]", dtypes=(_stat_dtype(sum),), device=sum.device)
        if guard_or_false(stat.shape[0] != sum.shape[0]):
            raise ValueError(
                f"{name} must have shape ({sum.shape[0]},) (one entry per row of sum), got {tuple(stat.shape)}"
            )
    _check_param("weight", weight, sum)
    V.check_real("alpha", alpha)


def _check_cuda_width(name: str, value: Tensor) -> None:
    if guard_or_false(value.shape[1] > MAX_CUDA_FEATURES):
        raise ValueError(
            f"{name} must have at most {MAX_CUDA_FEATURES} features on CUDA (the Triton kernels keep "
            f"whole rows in registers), got shape {tuple(value.shape)}"
        )


def _check_add_layer_norm_cuda(x, residual, alpha, weight, bias, eps) -> None:
    check_add_layer_norm(x, residual, alpha, weight, bias, eps)
    _check_cuda_width("x", x)


def _check_add_layer_norm_backward_cuda(grad_out, grad_sum, sum, mean, rstd, weight, alpha) -> None:
    check_add_layer_norm_backward(grad_out, grad_sum, sum, mean, rstd, weight, alpha)
    _check_cuda_width("sum", sum)


# ----------------------------------------------------------------------------- registration
register_cuda("add_layer_norm", _check_add_layer_norm_cuda)
register_cuda("add_layer_norm_backward", _check_add_layer_norm_backward_cuda)
refuse_double_backward("add_layer_norm_backward")
# A residual stream is never rounded to half precision: an fp32 stream plus a bf16 block
# output is summed and normalised in fp32 (as the unfused add promotes).
register_autocast("add_layer_norm", "promote")


@torch.library.register_fake("dynenc::add_layer_norm")
def _(x, residual, alpha, weight, bias, eps):
    stats = x.new_empty(x.shape[0], dtype=_stat_dtype(x))
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.register_fake("dynenc::add_layer_norm_backward")
def _(grad_out, grad_sum, sum, mean, rstd, weight, alpha):
    dim = sum.shape[1]
    return (
        sum.new_empty(sum.shape),
        sum.new_empty(sum.shape),
        (sum if weight is None else weight).new_empty(dim),
        sum.new_empty(dim),
    )


def _setup(ctx, inputs, output):
    x, residual, alpha, weight, bias, eps = inputs
    total, _, mean, rstd = output
    ctx.save_for_backward(total, mean, rstd, weight)
    ctx.alpha, ctx.has_bias = alpha, bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    # An unused output gets None, not a zero-filled buffer: the sum that only feeds the
    # layer's final norm has no gradient of its own.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_sum, grad_out, _grad_mean, _grad_rstd):
    total, mean, rstd, weight = ctx.saved_tensors
    if grad_out is None:  # only the sum was used
        if grad_sum is None:
            return None, None, None, None, None, None
        return grad_sum, grad_sum * ctx.alpha, None, None, None, None
    grad_x, grad_residual, grad_weight, grad_bias = torch.ops.dynenc.add_layer_norm_backward(
        grad_out, grad_sum, total, mean, rstd, weight, ctx.alpha
    )
    return (
        grad_x,
        grad_residual,
        None,
        grad_weight if weight is not None else None,
        grad_bias if ctx.has_bias else None,
        None,
    )


torch.library.register_autograd("dynenc::add_layer_norm", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API
def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    alpha: float = 1.0,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor]:
    """A residual add and the LayerNorm of its sum in one pass (one kernel launch on CUDA).

    Args:
        x: ``[N, D]`` residual stream.
        residual: ``[N, D]`` block output (x's dtype and device).
        alpha: scale of ``residual`` (0.5 for a Conformer's half-step feed-forward blocks).
        weight, bias: ``[D]`` LayerNorm affine parameters (x's dtype), or None.
        eps: added to the variance.
    Returns:
        ``(sum, normed)``: ``sum = x + alpha * residual`` and
        ``normed = F.layer_norm(sum, (D,), weight, bias, eps)``, both ``[N, D]``.
    """
    x, residual, weight, bias = autocast("promote", x, residual, weight, bias)
    check_add_layer_norm(x, residual, alpha, weight, bias, eps)
    alpha, eps = float(alpha), float(eps)
    if native():
        total, normed, _, _ = torch.ops.dynenc.add_layer_norm(x, residual, alpha, weight, bias, eps)
        return total, normed
    return reference_add_layer_norm(x, residual, alpha, weight, bias, eps)
