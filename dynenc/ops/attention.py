"""Block-diagonal softmax self-attention over packed sequences (FlashAttention-varlen style):
every row attends exactly to the rows of its own sequence, optionally with WavLM's gated
relative-position bias (computed per tile inside the kernels; no ``[H, T, T]`` bias exists).

Example::

    >>> q, k, v = (torch.randn(7, 2, 16) for _ in range(3))     # 7 rows, 2 heads, head_dim 16
    >>> cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> out = dynenc.ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen=4)   # [7, 2, 16]

With WavLM's gated relative-position bias (``score[i, j, h] = (q_i . k_j) * scale
+ g[i, h] * E[bucket(p_j - p_i), h]``), frames 1 and 4 of the second sequence dropped::

    >>> positions = torch.tensor([0, 1, 2, 0, 2, 3, 5])          # frame index of each row
    >>> buckets = dynenc.ops.relative_position_buckets(6)        # int64 [11]: P = 6 positions
    >>> table = torch.randn(320, 2)                              # rel_attn_embed.weight [num_buckets, H]
    >>> gate = torch.rand(7, 2) + 1                              # per-(row, head) gate [N, H]
    >>> out = dynenc.ops.varlen_attention(q, k, v, cu_seqlens, 4, bias_table=table, bias_buckets=buckets,
    ...                                   bias_gate=gate, positions=positions)   # [7, 2, 16]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import validation as V
from .registry import autocast, native, refuse_double_backward, register_autocast, register_cuda

__all__ = ["materialized_position_bias", "relative_position_buckets", "varlen_attention"]

BIAS_ARGUMENTS = ("bias_table", "bias_buckets", "bias_gate", "positions")


def relative_position_buckets(
    num_positions: int, num_buckets: int = 320, max_distance: int = 800, device=None
) -> Tensor:
    """WavLM's bidirectional log buckets of every relative distance ``r = p_j - p_i`` in
    ``[-(P - 1), P - 1]`` (``P = num_positions``), stored at index ``r + P - 1``: exactly
    ``transformers``' ``WavLMAttention._relative_positions_bucket`` (and torchaudio's
    ``WavLMSelfAttention``'s, whose defaults are ``num_buckets=32, max_distance=128``), computed
    on ``device`` (its float32 ``log`` decides the bucket edges, as theirs does on the model's).

    Returns:
        int64 ``[2 * num_positions - 1]``, values in ``[0, num_buckets)``: the ``bias_buckets``
        argument of :func:`varlen_attention`.
    """
    V.check_int("num_positions", num_positions, low=1)
    V.check_int("num_buckets", num_buckets, low=4)
    half = num_buckets // 2
    max_exact = half // 2
    V.check_int("max_distance", max_distance, low=max_exact + 1)
    relative = torch.arange(1 - num_positions, num_positions, dtype=torch.long, device=device)
    buckets = (relative > 0).to(torch.long) * half
    distance = torch.abs(relative)
    is_small = distance < max_exact
    # The float32 expression of transformers, operation for operation (the truncation below
    # makes the bucket edges depend on every rounding).
    large = torch.log(distance.float() / max_exact)
    large = large / math.log(max_distance / max_exact)
    large = large * (half - max_exact)
    large = (max_exact + large).to(torch.long)
    large = torch.min(large, torch.full_like(large, half - 1))
    return buckets + torch.where(is_small, distance, large)


def materialized_position_bias(bias_table: Tensor, bias_buckets: Tensor, positions: Tensor) -> Tensor:
    """The ungated bias ``E[bucket(p_j - p_i), h]`` of every query-key pair as a tensor: what
    the reference, a padded export graph and training-time attention dropout build (the
    kernels never do).

    Args:
        bias_table: ``[num_buckets, H]``; bias_buckets: int64 ``[2P - 1]`` (as :func:`varlen_attention`).
        positions: int64 ``[..., T]`` in ``[0, P)``.
    Returns:
        ``[..., H, T, T]`` (query, key).
    """
    num_positions = (bias_buckets.shape[0] + 1) // 2
    relative = positions[..., None, :] - positions[..., :, None] + (num_positions - 1)  # r + P - 1
    return bias_table[bias_buckets[relative]].movedim(-1, -3)


def reference_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    scale: Optional[float] = None,
    bias_table: Optional[Tensor] = None,
    bias_buckets: Optional[Tensor] = None,
    bias_gate: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> Tensor:
    """Softmax attention of each sequence alone (plus the gated relative-position bias when
    given, materialised per sequence), in plain PyTorch."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, T, Dh]
        scores = (qs @ ks.transpose(-1, -2)) * scale
        if bias_table is not None:
            assert bias_buckets is not None and bias_gate is not None and positions is not None
            gate = bias_gate[start:end].t()[:, :, None]  # [H, T, 1]
            scores = scores + gate * materialized_position_bias(bias_table, bias_buckets, positions[start:end])
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


def check_bias(
    q: Tensor,
    bias_table: Optional[Tensor],
    bias_buckets: Optional[Tensor],
    bias_gate: Optional[Tensor],
    positions: Optional[Tensor],
) -> bool:
    """Shapes, dtypes and devices of the bias arguments (all four or none); whether given."""
    given = dict(zip(BIAS_ARGUMENTS, (bias_table, bias_buckets, bias_gate, positions)))
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == len(given):
        return False
    if missing:
        present = [name for name in given if name not in missing]
        raise ValueError(
            f"the relative-position bias needs all of {', '.join(BIAS_ARGUMENTS)}: got {', '.join(present)} "
            f"but {', '.join(missing)} missing"
        )
    assert bias_table is not None and bias_buckets is not None and bias_gate is not None and positions is not None
    rows, heads = q.shape[0], q.shape[1]
    V.check_tensor("bias_table", bias_table, dim=2, layout="[num_buckets, heads]", dtypes=V.FLOATING, device=q.device)
    if bias_table.dtype != q.dtype:
        raise TypeError(f"bias_table must have q's dtype {q.dtype}, got {bias_table.dtype}")
    if guard_or_false(bias_table.shape[1] != heads):
        raise ValueError(
            f"bias_table must be [num_buckets, {heads}] (one column per head), got {tuple(bias_table.shape)}"
        )
    V.check_tensor(
        "bias_buckets", bias_buckets, dim=1, layout="[2 * num_positions - 1]", dtypes=(torch.int64,), device=q.device
    )
    if guard_or_false(bias_buckets.shape[0] % 2 == 0):
        raise ValueError(
            f"bias_buckets must have 2 * num_positions - 1 entries (an odd number), got {bias_buckets.shape[0]}"
        )
    V.check_tensor("bias_gate", bias_gate, dim=2, layout="[rows, heads]", dtypes=V.FLOATING, device=q.device)
    if bias_gate.dtype != q.dtype:
        raise TypeError(f"bias_gate must have q's dtype {q.dtype}, got {bias_gate.dtype}")
    if guard_or_false(bias_gate.shape[0] != rows) or guard_or_false(bias_gate.shape[1] != heads):
        raise ValueError(f"bias_gate must be [{rows}, {heads}] (q's rows and heads), got {tuple(bias_gate.shape)}")
    V.check_tensor("positions", positions, dim=1, layout="[rows]", dtypes=(torch.int64,), device=q.device)
    if guard_or_false(positions.shape[0] != rows):
        raise ValueError(f"positions must have {rows} entries (one per row of q), got {positions.shape[0]}")
    return True


def check_bias_values(
    bias_table: Optional[Tensor], bias_buckets: Optional[Tensor], positions: Optional[Tensor]
) -> None:
    """``positions`` in ``[0, P)`` (``bias_buckets`` has ``2P - 1`` entries) and
    ``bias_buckets`` in ``[0, num_buckets)``. One host sync."""
    if bias_table is None or bias_buckets is None or positions is None:
        return
    num_positions = (bias_buckets.shape[0] + 1) // 2
    ranges = [("bias_buckets", bias_buckets, 0, bias_table.shape[0] - 1, "num_buckets - 1")]
    if positions.numel():
        ranges.append(("positions", positions, 0, num_positions - 1, "num_positions - 1"))
    V.check_range(ranges)


def check_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
    bias_table: Optional[Tensor] = None,
    bias_buckets: Optional[Tensor] = None,
    bias_gate: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
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
    check_bias(q, bias_table, bias_buckets, bias_gate, positions)


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
    bias_table: Optional[Tensor] = None,
    bias_buckets: Optional[Tensor] = None,
    bias_gate: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> None:
    check_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, bias_table, bias_buckets, bias_gate, positions)
    V.check_like("grad_out", grad_out, "q", q, dims=(0, 1, 2))
    V.check_like("out", out, "q", q, dims=(0, 1, 2))
    V.check_tensor("logsumexp", logsumexp, dim=2, layout="[rows, heads]", dtypes=(torch.float32,), device=q.device)


def check_values_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
    bias_table: Optional[Tensor] = None,
    bias_buckets: Optional[Tensor] = None,
    bias_gate: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> None:
    # max_seqlen sizes the GPU grid: a sequence longer than it would leave rows never computed.
    V.check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    # The kernels index the table through the buckets, and the buckets through the positions.
    check_bias_values(bias_table, bias_buckets, positions)


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
    bias_table: Optional[Tensor] = None,
    bias_buckets: Optional[Tensor] = None,
    bias_gate: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> None:
    V.check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    check_bias_values(bias_table, bias_buckets, positions)


register_cuda("varlen_attention", check_varlen_attention, check_values_varlen_attention)
register_cuda("varlen_attention_backward", check_varlen_attention_backward, check_values_varlen_attention_backward)
refuse_double_backward("varlen_attention_backward")
# Every floating input follows the autocast dtype, the bias table and gate included (they
# must have q's dtype); the kernels add the bias and accumulate in fp32.
register_autocast("varlen_attention", "lower")


@torch.library.register_fake("dynenc::varlen_attention")
def _(q, k, v, cu_seqlens, max_seqlen, scale, bias_table=None, bias_buckets=None, bias_gate=None, positions=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("dynenc::varlen_attention_backward")
def _(
    grad_out,
    q,
    k,
    v,
    out,
    logsumexp,
    cu_seqlens,
    max_seqlen,
    scale,
    bias_table=None,
    bias_buckets=None,
    bias_gate=None,
    positions=None,
):
    # Without a bias the two bias gradients are empty [0, H] tensors.
    no_bias = (0, q.shape[1])
    grad_gate = q.new_empty(no_bias if bias_gate is None else bias_gate.shape)
    grad_table = q.new_empty(no_bias if bias_table is None else bias_table.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_gate, grad_table


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, bias_table, bias_buckets, bias_gate, positions = inputs
    out, logsumexp = output
    ctx.save_for_backward(q, k, v, out, logsumexp, cu_seqlens, bias_table, bias_buckets, bias_gate, positions)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(logsumexp)


def _backward(ctx, grad_out, _grad_logsumexp):
    q, k, v, out, logsumexp, cu_seqlens, bias_table, bias_buckets, bias_gate, positions = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_gate, grad_table = torch.ops.dynenc.varlen_attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        logsumexp,
        cu_seqlens,
        ctx.max_seqlen,
        ctx.scale,
        bias_table,
        bias_buckets,
        bias_gate,
        positions,
    )
    if bias_table is None:
        grad_gate = grad_table = None
    return grad_q, grad_k, grad_v, None, None, None, grad_table, None, grad_gate, None


torch.library.register_autograd("dynenc::varlen_attention", _backward, setup_context=_setup)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
    *,
    bias_table: Optional[Tensor] = None,
    bias_buckets: Optional[Tensor] = None,
    bias_gate: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> Tensor:
    """Block-diagonal softmax attention over packed sequences, optionally with WavLM's gated
    relative-position bias.

    ``score[i, j, h] = (q_i . k_j) * scale + g[i, h] * E[bucket(p_j - p_i), h]`` for rows ``i``,
    ``j`` of one sequence (the bias term only when the four bias arguments are given; all four
    or none). The bias is computed per tile inside the kernels: no ``[H, T, T]`` tensor exists.

    Args:
        q, k, v: ``[N, H, Dh]`` (one dtype, one device).
        cu_seqlens: int32 ``[B + 1]``; row t attends exactly to the rows of its own sequence.
        max_seqlen: host int >= the longest sequence (sizes GPU grids).
        scale: softmax scale, default ``1 / sqrt(Dh)``.
        bias_table: ``E``, ``[num_buckets, H]`` in q's dtype (``rel_attn_embed.weight``).
        bias_buckets: int64 ``[2P - 1]``: the bucket of relative distance ``r = p_j - p_i`` at
            index ``r + P - 1``, values in ``[0, num_buckets)``
            (:func:`relative_position_buckets`).
        bias_gate: ``g``, ``[N, H]`` in q's dtype: the gate of each (row, head).
        positions: ``p``, int64 ``[N]`` in ``[0, P)``: each row's frame index in its original
            sequence (not contiguous once frames are dropped).
    Returns:
        ``[N, H, Dh]``.

    Under autocast every floating input, the table and the gate included, runs in the autocast
    dtype; the kernels add the bias and accumulate in fp32.
    """
    q, k, v, bias_table, bias_gate = autocast("lower", q, k, v, bias_table, bias_gate)
    bias = (bias_table, bias_buckets, bias_gate, positions)
    check_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, *bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if native():
        return torch.ops.dynenc.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, *bias)[0]
    if V.values_need_checking():
        check_values_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, *bias)
    return reference_varlen_attention(q, k, v, cu_seqlens, scale, *bias)
