"""A padded twin of :class:`~dynenc.model.DynamicConformer` in plain PyTorch modules and
standard ATen ops, sharing the encoder's parameters: what ``torch.jit.script``,
``torch.jit.trace`` and exports to runtimes without the ``dynenc::`` ops (ONNX) run.

It computes, for inference (eval mode), exactly what the packed encoder computes — each
utterance as if alone — on a padded ``[T, B, D]`` batch: attention masks padded keys, the
depthwise conv sees zeros at padded frames (so nothing leaks across a sequence's end), GroupNorm
takes per-utterance statistics over valid frames only, and padded output frames are zero.
Every sample runs the same fixed set of layers (a fixed budget); skipped layers follow the
encoder's ``skip_mode``. The work on padded frames is computed and discarded: this is the
portable path, not the fast one.

Example::

    >>> encoder = dynenc.DynamicConformer(144, 4, 576, 8, 15).eval()
    >>> scripted = torch.jit.script(encoder)            # scripts PaddedConformer(encoder)
    >>> budget = PaddedConformer(encoder, layers=[1, 3, 5, 7]).eval()   # 4 of 8 layers
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Set, Tuple, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: model.py imports this module
    from .layer import DynamicConformerLayer, _ConvolutionModule, _ConvParts
    from .model import DynamicConformer


def layer_span(
    num_layers: int, layers: Optional[Sequence[int]], start: int, stop: Optional[int]
) -> Tuple[Set[int], int]:
    """``(the 0-based layers that run, stop)`` of a padded twin over layers ``start..stop - 1``
    of ``num_layers`` (``layers`` None: all; ``stop`` None: the last), checked."""
    runs = set(range(num_layers)) if layers is None else set(layers)
    if not runs <= set(range(num_layers)):
        raise ValueError(f"layers must be 0-based layer numbers in [0, {num_layers - 1}], got {sorted(runs)}")
    stop = num_layers if stop is None else stop
    if not 0 <= start <= stop <= num_layers:
        raise ValueError(f"start and stop must satisfy 0 <= start <= stop <= {num_layers}, got {start}, {stop}")
    return runs, stop


class PaddedConvolution(nn.Module):
    """The convolution module of a layer on ``[T, B, D]`` with padded frames zeroed before the
    depthwise conv (the per-sequence zero padding of the packed op)."""

    def __init__(self, conv_module: _ConvolutionModule) -> None:
        super().__init__()
        self.layer_norm = conv_module.layer_norm
        self.pointwise1, self.glu, self.depthwise, self.norm, self.activation, self.pointwise2, self.dropout = cast(
            "_ConvParts", conv_module.sequential
        )
        self.group_norm = isinstance(self.norm, nn.GroupNorm)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """``x [T, B, D]``, ``valid`` float ``[T, B, 1]`` (1 at valid frames) -> ``[T, B, D]``."""
        h = self.layer_norm(x).permute(1, 2, 0)  # [B, D, T]
        h = self.glu(self.pointwise1(h))
        mask = valid.permute(1, 2, 0)  # [B, 1, T]
        h = self.depthwise(h * mask)
        if self.group_norm:
            # GroupNorm(1, C) of each utterance over its valid frames x channels only.
            count = (mask.sum(2, keepdim=True) * h.shape[1]).clamp_min(1.0)
            mean = (h * mask).sum([1, 2], keepdim=True) / count
            var = (((h - mean) * mask) ** 2).sum([1, 2], keepdim=True) / count
            h = (h - mean) * torch.rsqrt(var + self.norm.eps)
            h = h * self.norm.weight[None, :, None] + self.norm.bias[None, :, None]
        else:
            h = self.norm(h)
        h = self.dropout(self.pointwise2(self.activation(h)))
        return h.permute(2, 0, 1)


class PaddedLayer(nn.Module):
    """One Conformer block on ``[T, B, D]`` (torchaudio's ``ConformerLayer`` computation with
    the leak-free convolution above); ``runs=False`` makes it a skipped layer."""

    def __init__(self, layer: DynamicConformerLayer, runs: bool, skip_mode: str) -> None:
        super().__init__()
        self.ffn1, self.ffn2 = layer.ffn1, layer.ffn2
        self.self_attn_layer_norm, self.self_attn = layer.self_attn_layer_norm, layer.self_attn
        self.self_attn_dropout = layer.self_attn_dropout
        self.conv_module = PaddedConvolution(layer.conv_module)
        self.final_layer_norm = layer.final_layer_norm
        self.convolution_first: bool = layer.convolution_first
        self.runs = runs
        self.skip_norm = skip_mode == "final_norm"

    def forward(self, x: Tensor, key_padding_mask: Tensor, valid: Tensor) -> Tensor:
        if not self.runs:
            return self.final_layer_norm(x) if self.skip_norm else x
        x = self.ffn1(x) * 0.5 + x
        if self.convolution_first:
            x = x + self.conv_module(x, valid)
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = x + self.self_attn_dropout(h)
        if not self.convolution_first:
            x = x + self.conv_module(x, valid)
        x = self.ffn2(x) * 0.5 + x
        return self.final_layer_norm(x)


class PaddedConformer(nn.Module):
    """``forward(input [B, T, D], lengths [B]) -> (output [B, T, D], lengths)`` like the encoder,
    running the 0-based ``layers`` (all by default) for every sample, over the encoder's layers
    ``start..stop - 1`` (all by default; a span serves an export that stops at an exit). Layers
    that neither run nor apply a skip norm are left out of the module. Inference only."""

    def __init__(
        self,
        encoder: DynamicConformer,
        layers: Optional[Sequence[int]] = None,
        start: int = 0,
        stop: Optional[int] = None,
    ) -> None:
        super().__init__()
        num_layers = len(encoder.conformer_layers)
        runs, stop = layer_span(num_layers, layers, start, stop)
        skip_norm = encoder.skip_mode == "final_norm"
        self.conformer_layers = nn.ModuleList(
            PaddedLayer(cast("DynamicConformerLayer", layer), i in runs, encoder.skip_mode)
            for i, layer in enumerate(encoder.conformer_layers)
            if start <= i < stop and (i in runs or skip_norm)
        )

    def forward(self, input: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        if self.training:
            raise RuntimeError("PaddedConformer is for inference: call .eval() (training runs the packed encoder)")
        frames = torch.ceil(lengths).long() if lengths.is_floating_point() else lengths.long()
        positions = torch.arange(input.shape[1], device=input.device)[None, :]
        valid = (positions < frames[:, None]).t().unsqueeze(-1).to(input.dtype)  # [T, B, 1]
        # An empty utterance keeps one (zero) key so no softmax row is fully masked.
        key_padding_mask = positions >= frames.clamp_min(1)[:, None]
        x = input.transpose(0, 1) * valid
        for layer in self.conformer_layers:
            x = layer(x, key_padding_mask, valid)
        return (x * valid).transpose(0, 1), lengths

    def finish(self, x: Tensor, lengths: Tensor) -> Tensor:
        """What a head reads of the output: itself (the Conformer has no final norm)."""
        return x
