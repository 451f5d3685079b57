"""A padded twin of :class:`~dynenc.foundation.DynamicTransformer` in standard ATen ops,
sharing its parameters: what exports to runtimes without the ``dynenc::`` ops (ONNX) run.

For inference it computes what the packed encoder computes, each utterance as if alone, on a
padded ``[B, T, D]`` batch: padded keys are masked, WavLM's gated relative position bias is
materialised (``[H, T, T]``: the portable path, not the fast one) and padded output frames
are zero. Every sample runs the same fixed set of layers (a fixed budget).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import materialized_position_bias, relative_position_buckets
from ..padded import layer_span
from ..routing import valid_frames
from .features import embed_padded
from .layer import bias_gate, projections


class PaddedTransformerLayer(nn.Module):
    """One :class:`~dynenc.foundation.DynamicTransformerLayer` on ``[B, T, D]`` (shared
    submodules); ``runs=False`` makes it a skipped layer (the identity)."""

    def __init__(self, layer: Any, runs: bool) -> None:
        super().__init__()
        self.attention, self.dropout, self.feed_forward = layer.attention, layer.dropout, layer.feed_forward
        self.layer_norm, self.final_layer_norm = layer.layer_norm, layer.final_layer_norm
        self.pre_norm: bool = layer.pre_norm
        self.runs = runs

    def forward(self, x: Tensor, key_bias: Tensor, position_bias: Optional[Tensor]) -> Tensor:
        """``x [B, T, D]``, ``key_bias [B, 1, 1, T]`` (0 or -inf at padded keys), WavLM's
        ``position_bias [H, T, T]`` or None -> ``[B, T, D]``."""
        if not self.runs:
            return x
        if self.pre_norm:
            h = x + self.dropout(self._attention(self.layer_norm(x), key_bias, position_bias))
            return h + self.feed_forward(self.final_layer_norm(h))
        h = self.layer_norm(x + self.dropout(self._attention(x, key_bias, position_bias)))
        return self.final_layer_norm(h + self.feed_forward(h))

    def _attention(self, x: Tensor, key_bias: Tensor, position_bias: Optional[Tensor]) -> Tensor:
        batch, frames, dim = x.shape
        heads = self.attention.num_heads
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = projections(self.attention)
        shape = (batch, frames, heads, dim // heads)
        q, k, v = (F.linear(x, w, b).view(shape).transpose(1, 2) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(dim // heads)) + key_bias
        if position_bias is not None:
            gate = bias_gate(self.attention, x.reshape(batch * frames, dim)).view(batch, frames, heads)
            scores = scores + gate.transpose(1, 2).unsqueeze(-1) * position_bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(batch, frames, dim)
        return F.linear(out, wo, bo)


class PaddedTransformer(nn.Module):
    """``forward(input [B, T, D], lengths [B]) -> (output [B, T, D], lengths)`` like the encoder
    on its embedded input (the span starting at layer 0 runs the embedding first), running the
    0-based ``layers`` (all by default) of the encoder's layers ``start..stop - 1``.
    :meth:`finish` is what a head reads (a pre-LN model's final norm). Inference only."""

    def __init__(
        self, encoder: Any, layers: Optional[Sequence[int]] = None, start: int = 0, stop: Optional[int] = None
    ) -> None:
        super().__init__()
        num_layers = encoder.num_layers
        runs, stop = layer_span(num_layers, layers, start, stop)
        self.pos_conv_embed, self.layer_norm, self.dropout = encoder.pos_conv_embed, encoder.layer_norm, encoder.dropout
        self.pre_norm: bool = encoder.pre_norm
        self.embeds = start == 0
        self.relative_position = encoder.relative_position
        # The bias table lives in layer 0, which a later span leaves out: a reference to its embedding.
        self.rel_attn_embed = encoder.layers[0].attention.rel_attn_embed if self.relative_position else None
        self.layers = nn.ModuleList(
            PaddedTransformerLayer(layer, i in runs) for i, layer in enumerate(encoder.layers) if start <= i < stop
        )

    def forward(self, input: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        if self.training:
            raise RuntimeError("PaddedTransformer is for inference: call .eval() (training runs the packed encoder)")
        frames = lengths.long()
        valid = valid_frames(frames, input.shape[1])
        x = embed_padded(self, input, frames) if self.embeds else input
        # An empty utterance keeps one (zero) key so no softmax row is fully masked.
        padded_keys = ~valid_frames(frames.clamp_min(1), input.shape[1])
        key_bias = torch.zeros(padded_keys.shape, dtype=x.dtype, device=x.device).masked_fill(padded_keys, -math.inf)
        key_bias = key_bias[:, None, None, :]
        position_bias = None if self.rel_attn_embed is None else self._position_bias(input.shape[1])
        for layer in self.layers:
            x = layer(x, key_bias, position_bias)
        return x * valid.unsqueeze(-1).to(x.dtype), lengths

    def _position_bias(self, frames: int) -> Tensor:
        """``[H, T, T]``: the relative position bias of every query-key pair (ungated)."""
        embed: Any = self.rel_attn_embed
        num_buckets, max_distance = self.relative_position
        buckets = relative_position_buckets(frames, num_buckets, max_distance, device=embed.weight.device)
        return materialized_position_bias(embed.weight, buckets, torch.arange(frames, device=buckets.device))

    def finish(self, x: Tensor, lengths: Tensor) -> Tensor:
        """What a head reads of the span's output ``x [B, T, D]``: a pre-LN model's final norm
        (pads zero again), or ``x``."""
        if not self.pre_norm:
            return x
        return self.layer_norm(x) * valid_frames(lengths.long(), x.shape[1]).unsqueeze(-1).to(x.dtype)
