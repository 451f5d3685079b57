"""Reference implementations of every dynenc op in plain PyTorch.

These are the test oracles: each C++ (``csrc/``) and Triton (``kernels/``) kernel is
checked against the function of the same name here. They favour clarity over speed.

Conventions (FlashAttention-varlen style):
    * a packed batch is ``x: [N, D]`` (all valid frames of all sequences, back to back)
      plus ``cu_seqlens: int32 [B + 1]`` with ``cu_seqlens[0] = 0`` and
      ``cu_seqlens[b + 1] - cu_seqlens[b]`` the length of sequence ``b`` (may be 0);
    * an ``index`` is an int64 vector of distinct row numbers into a packed buffer;
      ``index=None`` means "the first M rows" (the prefix case of sorted depths).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def gated_residual_scatter(x: Tensor, y: Tensor, gate: Optional[Tensor], index: Optional[Tensor]) -> Tensor:
    """Gated residual update of the active rows, written into a copy of the full buffer.

    ``out = x; out[index] = x[index] + gate * (y - x[index])``

    Args:
        x: ``[N, D]`` full packed buffer (layer input).
        y: ``[M, D]`` block output of the M active rows.
        gate: ``[M]`` per-row gate (hard 0/1 or soft), or None for gate = 1.
        index: ``[M]`` int64 distinct rows of ``x`` that are active, or None for rows ``0..M-1``.
    Returns:
        ``[N, D]``; rows not in ``index`` equal ``x``.
    """
    out = x.clone()
    rows = out[: y.shape[0]] if index is None else x.index_select(0, index)
    new = y if gate is None else rows + gate.unsqueeze(-1).to(y.dtype) * (y - rows)
    if index is None:
        out[: y.shape[0]] = new
    else:
        out.index_copy_(0, index, new)
    return out


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Compact the active rows: ``x[index]`` (``[N, D]`` -> ``[M, D]``)."""
    return x.index_select(0, index)


def scatter_rows(y: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Inverse of :func:`gather_rows`: ``out = zeros([num_rows, D]); out[index] = y``."""
    out = y.new_zeros((num_rows, y.shape[1]))
    out.index_copy_(0, index, y)
    return out


def _sequence_ids(cu_seqlens: Tensor, num_rows: int) -> Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=num_rows)


def varlen_dwconv1d(x: Tensor, cu_seqlens: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise 'same' conv1d over packed sequences, zero padding at each sequence edge.

    ``out[t, c] = bias[c] + sum_k weight[c, k] * x[t + k - (K - 1) // 2, c]`` where the
    input row is taken as zero when it falls outside ``t``'s own sequence.

    Args:
        x: ``[N, C]`` packed, channels last.
        cu_seqlens: int32 ``[B + 1]``.
        weight: ``[C, K]`` with K odd (``Conv1d(groups=C).weight[:, 0, :]``).
        bias: ``[C]`` or None.
    Returns:
        ``[N, C]``.
    """
    num_rows, _ = x.shape
    kernel_size = weight.shape[1]
    pad = (kernel_size - 1) // 2
    seq = _sequence_ids(cu_seqlens, num_rows)
    rows = torch.arange(num_rows, device=x.device)
    out = torch.zeros_like(x) if bias is None else bias.expand_as(x).clone()
    for k in range(kernel_size):
        src = rows + (k - pad)
        valid = (src >= 0) & (src < num_rows)
        src_c = src.clamp(0, max(num_rows - 1, 0))
        valid = valid & (seq.index_select(0, src_c) == seq)
        out = out + torch.where(valid.unsqueeze(-1), x.index_select(0, src_c), 0.0) * weight[:, k]
    return out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: Optional[float] = None) -> Tensor:
    """Block-diagonal (per-sequence) softmax attention over packed sequences.

    Args:
        q, k, v: ``[N, H, Dh]``.
        cu_seqlens: int32 ``[B + 1]``; row t attends exactly to the rows of its own sequence.
        scale: softmax scale, default ``1 / sqrt(Dh)``.
    Returns:
        ``[N, H, Dh]``.
    """
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


def build_plan(row_mask: Tensor, cu_seqlens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-layer active row indices and active-subset ``cu_seqlens`` from a row mask.

    Args:
        row_mask: bool ``[L, N]``; ``row_mask[l, t]`` says packed row t runs layer l.
        cu_seqlens: int32 ``[B + 1]`` of the packed buffer.
    Returns:
        indices: int64 ``[S]``, the active rows of layer 0, then layer 1, ... (ascending
            within a layer), ``S = row_mask.sum()``;
        offsets: int64 ``[L + 1]``; layer l's rows are ``indices[offsets[l]:offsets[l + 1]]``;
        active_cu_seqlens: int32 ``[L, B + 1]``; layer l's compact sub-batch, sequences keep
            their order and inactive ones get length 0.
    """
    num_layers, num_rows = row_mask.shape
    seq = _sequence_ids(cu_seqlens, num_rows)
    counts = torch.zeros(num_layers, cu_seqlens.numel() - 1, dtype=torch.int64, device=row_mask.device)
    counts.index_add_(1, seq, row_mask.long())
    active_cu = torch.nn.functional.pad(counts.cumsum(1), (1, 0)).to(torch.int32)
    offsets = torch.nn.functional.pad(row_mask.long().sum(1).cumsum(0), (1, 0))
    indices = row_mask.nonzero()[:, 1].contiguous()
    return indices, offsets, active_cu
