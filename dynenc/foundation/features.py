"""What runs before the transformer layers of a wav2vec2-family model, on padded batches but
equal, frame for frame, to each utterance run alone: the CNN feature extractor (its
GroupNorm's statistics over each utterance's valid frames only) and the convolutional
positional embedding (pads zero at its input, as the utterance's own zero padding)."""

from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import valid_frames


def _conv_lengths(conv: nn.Conv1d, lengths: Tensor) -> Tensor:
    """Valid output frames of an unpadded strided ``conv`` for ``lengths`` valid input frames."""
    return (torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1).clamp_min(0)


def conv_output_lengths(conv_layers: Any, lengths: Tensor) -> Tensor:
    """int64 ``[B]`` valid frames after the feature extractor for ``lengths`` waveform samples."""
    lengths = lengths.to(torch.int64)
    for block in conv_layers:
        lengths = _conv_lengths(block.conv, lengths)
    return lengths


def _masked_instance_norm(x: Tensor, valid: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``GroupNorm(C, C)`` of ``x [B, C, T]`` with each sample's statistics over its valid
    frames (``valid`` bool ``[B, T]``) only; pads are left as computed (never read back)."""
    mask = valid.unsqueeze(1).to(x.dtype)
    count = mask.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * mask).sum(-1, keepdim=True) / count
    var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    normed = (x - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        normed = normed * norm.weight.view(1, -1, 1) + norm.bias.view(1, -1, 1)
    return normed


def _conv_block(block: Any, x: Tensor, norm_rows: Any) -> Tensor:
    """One upstream conv block on ``x [B, C_in, S]``: conv, its norm (a GroupNorm through
    ``norm_rows(x, norm)``, a LayerNorm over channels), GELU or HF's ``activation``."""
    x = block.conv(x)
    norm = getattr(block, "layer_norm", None)
    if isinstance(norm, nn.GroupNorm):
        x = norm_rows(x, norm)
    elif isinstance(norm, nn.LayerNorm):
        x = F.layer_norm(x.transpose(1, 2), norm.normalized_shape, norm.weight, norm.bias, norm.eps).transpose(1, 2)
    activation = getattr(block, "activation", None)
    return F.gelu(x) if activation is None else activation(x)


def extract_conv_features(conv_layers: Any, waveforms: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """The CNN feature extractor of torchaudio's or HF's wav2vec2 family on a padded batch.

    In eager mode each waveform runs alone (its valid samples only: no convolution of padding,
    the GroupNorm's own fused kernel); while tracing (``torch.compile``, ``torch.export``) the
    padded batch runs at once, the GroupNorm's statistics masked to each utterance's valid
    frames. Both give each waveform's valid frames as the extractor run on it alone.

    Args:
        conv_layers: the upstream ``feature_extractor.conv_layers`` (each block: ``conv``, an
            optional ``layer_norm`` — a per-channel GroupNorm or a LayerNorm over channels —
            and GELU, or HF's ``activation``).
        waveforms: ``[B, S]``.
        lengths: int ``[B]`` valid samples.
    Returns:
        ``(features [B, T', C], lengths [B])`` with T' the frames of S samples; pads zero in
        eager mode.
    """
    lengths = lengths.to(torch.int64)
    frames = conv_output_lengths(conv_layers, lengths)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        x = waveforms.unsqueeze(1)
        valid_samples = lengths
        for block in conv_layers:
            valid_samples = _conv_lengths(block.conv, valid_samples)
            x = _conv_block(
                block, x, lambda h, norm, n=valid_samples: _masked_instance_norm(h, valid_frames(n, h.shape[-1]), norm)
            )
        return x.transpose(1, 2), frames
    padded_frames = int(conv_output_lengths(conv_layers, torch.tensor([waveforms.shape[1]]))[0])
    features = None
    for b, (samples, count) in enumerate(zip(lengths.tolist(), frames.tolist())):
        if count == 0:
            continue  # shorter than the receptive field: no frame
        x = waveforms[b : b + 1, :samples].unsqueeze(1)
        for block in conv_layers:
            x = _conv_block(block, x, lambda h, norm: norm(h))
        if features is None:
            features = x.new_zeros(waveforms.shape[0], padded_frames, x.shape[1])
        features[b, :count] = x[0].transpose(0, 1)
    if features is None:  # no waveform has a frame
        channels = conv_layers[-1].conv.out_channels
        features = waveforms.new_zeros(waveforms.shape[0], padded_frames, channels)
    return features, frames


def project_waveforms(
    feature_extractor: Any, feature_projection: nn.Module, waveforms: Tensor, lengths: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """The CNN features of ``waveforms [B, S]`` (``lengths`` int ``[B]``,
    :func:`extract_conv_features`) and their projection to the model's width (torchaudio's
    ``FeatureProjection`` or HF's, which also returns its normalised features).

    Returns:
        ``(projected [B, T', D], features [B, T', C] (HF's normalised ones where it gives them),
        frames [B])``.
    """
    features, frames = extract_conv_features(feature_extractor.conv_layers, waveforms, lengths)
    projected = feature_projection(features)
    if isinstance(projected, tuple):
        return projected[0], projected[1], frames
    return projected, features, frames


def positional_embedding(module: Any, x: Tensor, valid: Tensor) -> Tensor:
    """The convolutional positional embedding ``[B, T, D]`` of ``x [B, T, D]`` whose pads are
    zero (``valid`` bool ``[B, T]``): torchaudio's ``ConvolutionalPositionalEmbedding`` or HF's
    ``*PositionalConvEmbedding`` (HuBERT's optional ``batch_norm`` first, its output re-zeroed
    at pads, which the utterance alone pads with zeros)."""
    h = x.transpose(1, 2)
    batch_norm = getattr(module, "batch_norm", None)
    if batch_norm is not None:
        if batch_norm.training:
            raise ValueError(
                "conv_pos_batch_norm in training is not supported: its batch statistics would mix utterances "
                "and pads; train with it in eval mode (model.encoder.pos_conv_embed.batch_norm.eval())"
            )
        h = batch_norm(h) * valid.unsqueeze(1).to(h.dtype)
    h = module.conv(h)
    remove = module.num_remove if hasattr(module, "num_remove") else module.padding.num_pad_remove
    if remove:
        h = h[..., :-remove]
    activation = getattr(module, "activation", None)
    h = F.gelu(h) if activation is None else activation(h)
    return h.transpose(1, 2)


def embed_padded(encoder: Any, x: Tensor, frames: Tensor) -> Tensor:
    """What a :class:`~dynenc.foundation.DynamicTransformer` (or its padded twin) runs before its
    layers on projected features ``x [B, T, D]`` with ``frames`` int ``[B]`` valid: pads set to
    zero, the positional convolution added, then (post-LN) the encoder's LayerNorm, then its
    dropout; pads zero again. Valid frames equal each utterance run alone."""
    valid = valid_frames(frames, x.shape[1]).unsqueeze(-1).to(x.dtype)
    x = x * valid
    x = x + positional_embedding(encoder.pos_conv_embed, x, valid[..., 0] > 0)
    if not encoder.pre_norm:
        x = encoder.layer_norm(x)
    return encoder.dropout(x) * valid
