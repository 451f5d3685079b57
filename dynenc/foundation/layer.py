"""``DynamicTransformerLayer``: one wav2vec2 / HuBERT / WavLM transformer layer on packed rows.

It holds the upstream layer's own submodules under their own names (``attention``,
``dropout``, ``layer_norm``, ``feed_forward``, ``final_layer_norm``; torchaudio's and Hugging
Face's layers share them), so state dicts load unchanged. Only the attention is dynenc's:
``dynenc::varlen_attention`` on the packed rows of each sequence, with WavLM's gated relative
position bias computed inside the op from the bucket table, the gate and each row's position.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..routing import VarlenBatch, valid_frames


class RelativePositionBias(NamedTuple):
    """WavLM's relative position bias, shared by every layer of a forward.

    Attributes:
        table: ``[num_buckets, H]``, layer 0's ``rel_attn_embed.weight``.
        buckets: int64 ``[2P - 1]``: the bucket of relative distance r at ``r + P - 1``
            (:func:`dynenc.ops.relative_position_buckets`), P >= every row's position + 1.
    """

    table: Tensor
    buckets: Tensor


def projections(attention: Any) -> Tuple[Tuple[Tensor, Optional[Tensor]], ...]:
    """``((weight [D, D], bias), ...)`` of the q, k, v and output projections of an upstream
    attention: separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` (HF, torchaudio's
    ``SelfAttention``) or torchaudio WavLM's inner ``nn.MultiheadAttention``."""
    if hasattr(attention, "q_proj"):
        linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)
        return tuple((linear.weight, linear.bias) for linear in linears)
    mha = attention.attention
    weights = mha.in_proj_weight.chunk(3)
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    return (*zip(weights, biases), (mha.out_proj.weight, mha.out_proj.bias))


def bias_gate(attention: Any, x: Tensor) -> Tensor:
    """WavLM's per-(row, head) gate ``[M, H]`` of the relative position bias, from the
    attention's input rows ``x [M, D]`` (``gru_rel_pos_linear`` on each head's slice); 1
    where the attention has no gate (torchaudio's ``gru_rel_pos=False``)."""
    heads = attention.num_heads
    if getattr(attention, "gru_rel_pos_linear", None) is None or not getattr(attention, "gru_rel_pos", True):
        return x.new_ones(x.shape[0], heads)
    proj = attention.gru_rel_pos_linear(x.view(x.shape[0], heads, x.shape[1] // heads))  # [M, H, 8]
    gate_a, gate_b = torch.sigmoid(proj.view(x.shape[0], heads, 2, 4).sum(-1)).unbind(-1)
    const = attention.gru_rel_pos_const.reshape(heads)
    return gate_a * (gate_b * const - 1.0) + 2.0


def attention_dropout(attention: Any) -> float:
    """The upstream attention's dropout probability on its attention weights."""
    mha = getattr(attention, "attention", None)
    value = mha.dropout if isinstance(mha, nn.MultiheadAttention) else getattr(attention, "dropout", 0.0)
    return float(value)


def dropout_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    batch: VarlenBatch,
    dropout: float,
    position_bias: Optional[RelativePositionBias] = None,
    gate: Optional[Tensor] = None,
) -> Tensor:
    """Each sequence's softmax attention with ``dropout`` on its probabilities (training; the
    fused op has none), as HF computes it: on a padded ``[S, H, T, Dh]`` view of the sub-batch
    with ``F.scaled_dot_product_attention``; WavLM's gated bias (``gate [M, H]``) is
    materialised for the sub-batch, ``[S, H, T, T]``. ``q, k, v [M, H, Dh]`` -> ``[M, H, Dh]``."""
    seqs, frames = batch.num_seqs, batch.max_seqlen
    rows, heads, head_dim = q.shape
    where = batch.padded_positions()

    def padded(t: Tensor) -> Tensor:  # [M, ...] -> [S, T, ...], pads zero
        return ops.scatter_rows(t.reshape(rows, -1), where, seqs * frames).view(seqs, frames, *t.shape[1:])

    q_, k_, v_ = (padded(t).transpose(1, 2) for t in (q, k, v))
    # An empty sequence keeps one (zero) key so no softmax row is fully masked.
    keys = valid_frames(batch.lengths.clamp_min(1), frames)
    mask = q.new_zeros(seqs, 1, 1, frames).masked_fill(~keys[:, None, None, :], float("-inf"))
    if position_bias is not None and gate is not None:
        positions = torch.zeros(seqs * frames, dtype=torch.int64, device=q.device)
        positions = positions.index_copy(0, where, batch.positions).view(seqs, frames)
        values = ops.materialized_position_bias(position_bias.table, position_bias.buckets, positions)  # [S, H, T, T]
        mask = mask + padded(gate).transpose(1, 2).unsqueeze(-1) * values
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, dropout_p=dropout)
    return ops.gather_rows(out.transpose(1, 2).reshape(seqs * frames, heads * head_dim), where).view(
        rows, heads, head_dim
    )


class DynamicTransformerLayer(nn.Module):
    """A wav2vec2-family transformer layer on packed rows ``[M, D]`` of a :class:`VarlenBatch`.

    Post-LN (``pre_norm=False``, wav2vec2/HuBERT/WavLM base):
    ``h = LN(x + Drop(Attn(x)))``, ``out = LN_final(h + FF(h))``. Pre-LN (``pre_norm=True``,
    HF's ``do_stable_layer_norm``, torchaudio's ``layer_norm_first``):
    ``h = x + Drop(Attn(LN(x)))``, ``out = h + FF(LN_final(h))``.

    Every dropout is the upstream module's. The varlen attention op has none on the attention
    probabilities, so in training with the upstream attention's dropout > 0 the attention runs
    on a padded view of each sub-batch (:func:`dropout_attention`); with it 0 (or in eval) it
    runs fused.
    """

    # The upstream layer's submodules (duck-typed: torchaudio's and HF's share these names).
    attention: Any
    dropout: nn.Module
    layer_norm: nn.Module
    feed_forward: nn.Module
    final_layer_norm: nn.Module

    def __init__(self, layer: nn.Module, pre_norm: bool) -> None:
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, batch: VarlenBatch, position_bias: Optional[RelativePositionBias] = None) -> Tensor:
        """``x [M, D]`` rows of ``batch`` -> ``[M, D]``; ``position_bias`` for WavLM."""
        if self.pre_norm:
            h = x + self.dropout(self._attention(self.layer_norm(x), batch, position_bias))
            return h + self.feed_forward(self.final_layer_norm(h))
        h = self.layer_norm(x + self.dropout(self._attention(x, batch, position_bias)))
        return self.final_layer_norm(h + self.feed_forward(h))

    def _attention(self, x: Tensor, batch: VarlenBatch, position_bias: Optional[RelativePositionBias]) -> Tensor:
        attention = self.attention
        heads = attention.num_heads
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = projections(attention)
        rows = x.shape[0]
        head_dim = wq.shape[0] // heads
        q, k, v = (
            torch.nn.functional.linear(x, w, b).view(rows, heads, head_dim) for w, b in ((wq, bq), (wk, bk), (wv, bv))
        )
        dropout = attention_dropout(attention) if self.training else 0.0
        if dropout > 0:
            gate = None if position_bias is None else bias_gate(attention, x)
            out = dropout_attention(q, k, v, batch, dropout, position_bias, gate)
        elif position_bias is None:
            out = ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)
        else:
            out = ops.varlen_attention(
                q,
                k,
                v,
                batch.cu_seqlens,
                batch.max_seqlen,
                bias_table=position_bias.table,
                bias_buckets=position_bias.buckets,
                bias_gate=bias_gate(attention, x),
                positions=batch.positions,
            )
        return torch.nn.functional.linear(out.reshape(rows, heads * head_dim), wo, bo)
