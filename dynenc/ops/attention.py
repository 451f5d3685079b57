"""Block-diagonal softmax self-attention over packed sequences (FlashAttention-varlen style):
every row attends exactly to the rows of its own sequence.

Example::

    >>> q, k, v = (torch.randn(7, 2, 16) for _ in range(3))     # 7 rows, 2 heads, head_dim 16
    >>> cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> out = dynenc.ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen=4)   # [7, 2, 16]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import validation as V
from .registry import autocast, native, refuse_double_backward, register_autocast, register_cuda

__all__ = ["varlen_attention"]


def reference_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: Optional[float] = None
) -> Tensor:
    """Softmax attention of each sequence alone, in plain PyTorch."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, T, Dh]
        probs = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


def check_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: Optional[float] = None
) -> None:
    V.check_tensor("q", q, dim=3, layout="[rows, heads, head_dim]", dtypes=V.FLOATING)
    if guard_or_false(q.shape[1] < 1) or guard_or_false(q.shape[2] < 1):
        raise ValueError(f"q must have at least one head and head_dim >= 1, got shape {tuple(q.shape)}")
    V.check_like("k", k, "q", q, dims=(0, 1, 2))
    V.check_like("v", v, "q", q, dims=(0, 1, 2))
    V.check_cu_seqlens(cu_seqlens, q.device)
    V.check_int("max_seqlen", max_seqlen, low=0)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def check_varlen_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    logsumexp: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
) -> None:
    check_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    V.check_like("grad_out", grad_out, "q", q, dims=(0, 1, 2))
    V.check_like("out", out, "q", q, dims=(0, 1, 2))
    V.check_tensor("logsumexp", logsumexp, dim=2, layout="[rows, heads]", dtypes=(torch.float32,), device=q.device)


def check_values_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: Optional[float] = None
) -> None:
    # max_seqlen sizes the GPU grid: a sequence longer than it would leave rows never computed.
    V.check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)


def check_values_varlen_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    logsumexp: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
) -> None:
    V.check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)


register_cuda("varlen_attention", check_varlen_attention, check_values_varlen_attention)
register_cuda("varlen_attention_backward", check_varlen_attention_backward, check_values_varlen_attention_backward)
refuse_double_backward("varlen_attention_backward")
register_autocast("varlen_attention", "lower")


@torch.library.register_fake("dynenc::varlen_attention")
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("dynenc::varlen_attention_backward")
def _(grad_out, q, k, v, out, logsumexp, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, logsumexp = output
    ctx.save_for_backward(q, k, v, out, logsumexp, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(logsumexp)


def _backward(ctx, grad_out, _grad_logsumexp):
    q, k, v, out, logsumexp, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.dynenc.varlen_attention_backward(
        grad_out.contiguous(), q, k, v, out, logsumexp, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return (*grads, None, None, None)


torch.library.register_autograd("dynenc::varlen_attention", _backward, setup_context=_setup)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: Optional[float] = None
) -> Tensor:
    """Block-diagonal softmax attention over packed sequences.

    Args:
        q, k, v: ``[N, H, Dh]`` (one dtype, one device).
        cu_seqlens: int32 ``[B + 1]``; row t attends exactly to the rows of its own sequence.
        max_seqlen: host int >= the longest sequence (sizes GPU grids).
        scale: softmax scale, default ``1 / sqrt(Dh)``.
    Returns:
        ``[N, H, Dh]``.
    """
    q, k, v = autocast("lower", q, k, v)
    check_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if native():
        return torch.ops.dynenc.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)[0]
    if V.values_need_checking():
        check_values_varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    return reference_varlen_attention(q, k, v, cu_seqlens, scale)
