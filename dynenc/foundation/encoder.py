"""``DynamicTransformer``: the transformer of a wav2vec2 / HuBERT / WavLM model on the routing
engine, with the upstream encoder's submodule names (``pos_conv_embed``, ``layer_norm``,
``dropout``, ``layers``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..engine import RoutedEncoder
from ..routing import VarlenBatch
from .features import embed_padded
from .layer import DynamicTransformerLayer, RelativePositionBias


class DynamicTransformer(RoutedEncoder):
    """The transformer of a wav2vec2-family model: positional convolution, then L layers on
    packed rows with ragged per-sample / per-frame depth.

    ``forward(input [B, T, D], lengths [B], **routing)`` runs the layers on the output of
    :meth:`embed` (:meth:`dynenc.engine.RoutedEncoder.forward`); a pre-LN model ends each
    sample with the encoder's LayerNorm after the last layer it ran.

    Args:
        pos_conv_embed: the upstream convolutional positional embedding.
        layer_norm: the encoder's LayerNorm: before the layers in post-LN models, after them
            (on each row, after the last layer it ran) in pre-LN ones.
        dropout: the encoder's dropout after the positional embedding.
        layers: the upstream layers; their submodules are adopted by
            :class:`DynamicTransformerLayer` under the same names.
        pre_norm: pre-LN layers (HF ``do_stable_layer_norm``, torchaudio ``layer_norm_first``).
        layer_drop: in training, the probability that a (sample, layer) pair is skipped when
            the call gives no routing of its own (HF's ``layerdrop``, torchaudio's
            ``layer_drop``, drawn per sample instead of per batch: the same marginal, and
            every rank still runs every layer).
        first_layer_kept: layer 0 is never dropped by ``layer_drop`` (HF's WavLM).
        relative_position: ``(num_buckets, max_distance)`` of WavLM's relative position bias,
            whose table is layer 0's ``attention.rel_attn_embed`` (used for every sample and
            layer, also where layer 0 is skipped), or None.
        checkpoint_layers: recompute each executed layer in the backward (training).
    """

    def __init__(
        self,
        pos_conv_embed: nn.Module,
        layer_norm: Any,
        dropout: nn.Module,
        layers: Sequence[Any],
        pre_norm: bool,
        layer_drop: float = 0.0,
        first_layer_kept: bool = False,
        relative_position: Optional[tuple] = None,
        checkpoint_layers: bool = False,
    ) -> None:
        super().__init__()
        self.pos_conv_embed = pos_conv_embed
        self.layer_norm = layer_norm
        self.dropout = dropout
        self.layers = nn.ModuleList(DynamicTransformerLayer(layer, pre_norm) for layer in layers)
        self.input_dim: int = layer_norm.normalized_shape[0]
        self.num_layers = len(self.layers)
        self.pre_norm = pre_norm
        self.layer_drop = layer_drop
        self.first_layer_kept = first_layer_kept
        self.relative_position = relative_position
        self.checkpoint_layers = checkpoint_layers
        first: Any = self.layers[0] if len(self.layers) else None
        self.num_heads: int = first.attention.num_heads if first is not None else 1
        self.ffn_dim: int = first.feed_forward.intermediate_dense.out_features if first is not None else 0

    def embed(self, x: Tensor, frames: Tensor) -> Tensor:
        """What runs before the layers, on projected features ``x [B, T, D]`` with ``frames``
        int ``[B]`` valid (:func:`~dynenc.foundation.features.embed_padded`): pads zero, the
        positional convolution, (post-LN) the LayerNorm, dropout. ``[B, T, D]``."""
        return embed_padded(self, x, frames)

    # ------------------------------------------------------------------ the family's parts
    def routed_layers(self) -> nn.ModuleList:
        return self.layers

    def weight_dtype(self) -> torch.dtype:
        return self.layer_norm.weight.dtype

    def default_layer_mask(self, batch_size: int, device: torch.device) -> Optional[Tensor]:
        """In training, ``layer_drop`` per (sample, layer) pair (layer 0 kept when
        ``first_layer_kept``), or None."""
        if not (self.training and self.layer_drop > 0):
            return None
        layer_mask = torch.rand(batch_size, self.num_layers, device=device) >= self.layer_drop
        if self.first_layer_kept:
            layer_mask[:, 0] = True
        return layer_mask

    def shardable_layers(self) -> List[nn.Module]:
        """Every layer but WavLM's layer 0, whose bias table every layer reads (it stays in the
        enclosing FSDP2 unit, unsharded for the whole forward and backward)."""
        layers = list(self.layers)
        return layers[1:] if self.relative_position is not None else layers

    def layer_inputs(self, batch: VarlenBatch) -> Dict[str, Any]:
        if self.relative_position is None:
            return {}
        num_buckets, max_distance = self.relative_position
        first: Any = self.layers[0]
        table = first.attention.rel_attn_embed.weight
        buckets = ops.relative_position_buckets(batch.max_seqlen, num_buckets, max_distance, device=table.device)
        return {"position_bias": RelativePositionBias(table, buckets)}

    def finish_rows(self, x: Tensor, batch: VarlenBatch) -> Tensor:
        return self.layer_norm(x) if self.pre_norm else x

    def padded(self, layers: Optional[Sequence[int]] = None, start: int = 0, stop: Optional[int] = None) -> nn.Module:
        from .padded import PaddedTransformer

        return PaddedTransformer(self, layers, start, stop)

    def layer_flops(self, tokens: int, sum_sq_lengths: float) -> float:
        """Estimated FLOPs of one layer: q/k/v/out projections, the feed-forward, attention's
        QK^T and PV (and WavLM's gate projection)."""
        d, f = int(self.input_dim), int(self.ffn_dim)
        per_token = 2 * 4 * d * d + 2 * 2 * d * f + (2 * 8 * d if self.relative_position else 0)
        return tokens * per_token + 4.0 * d * sum_sq_lengths
