"""Tiny torchaudio / Hugging Face wav2vec2-family models and their per-utterance oracles: each
utterance run alone through the upstream model's own modules, with a per-utterance layer
mask / gates applied around its own layers."""

from __future__ import annotations

from typing import Optional

import torch
import torchaudio
from torch import Tensor

TORCHAUDIO_TINY = dict(
    extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2), (16, 2, 2)],
    extractor_conv_bias=False,
    encoder_embed_dim=32,
    encoder_projection_dropout=0.0,
    encoder_pos_conv_kernel=8,
    encoder_pos_conv_groups=4,
    encoder_num_layers=3,
    encoder_num_heads=4,
    encoder_attention_dropout=0.0,
    encoder_ff_interm_features=64,
    encoder_ff_interm_dropout=0.0,
    encoder_dropout=0.0,
    encoder_layer_drop=0.0,
)


def torchaudio_tiny(wavlm: bool = False, layer_norm_first: bool = False, mode: str = "group_norm", aux=None):
    """A 3-layer D=32 torchaudio ``Wav2Vec2Model`` (``wavlm_model`` when ``wavlm``), eval mode."""
    torch.manual_seed(0)
    kwargs = dict(TORCHAUDIO_TINY, extractor_mode=mode, encoder_layer_norm_first=layer_norm_first, aux_num_out=aux)
    if wavlm:
        model = torchaudio.models.wavlm_model(encoder_num_buckets=16, encoder_max_distance=40, **kwargs)
    else:
        model = torchaudio.models.wav2vec2_model(**kwargs)
    return model.eval()


def hf_tiny(config_class, model_class, **overrides):
    """A 3-layer D=32 Hugging Face model of ``model_class``, eval mode."""
    torch.manual_seed(0)
    settings = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2),
        conv_kernel=(10, 3, 2),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        vocab_size=11,
    )
    if "WavLM" in config_class.__name__:
        settings.update(num_buckets=16, max_bucket_distance=40)
    settings.update(overrides)
    return model_class(config_class(**settings)).eval()


def waveforms(lengths=(4000, 2500, 1200), seed: int = 1):
    """``([B, S], lengths int64 [B])`` random waveforms, right-padded with noise (never read)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    return torch.randn(len(lengths), int(lengths.max()), generator=generator), lengths


def torchaudio_layers(model, wave: Tensor, mask: Optional[Tensor] = None, gates: Optional[Tensor] = None) -> Tensor:
    """torchaudio's own modules on one utterance ``wave [S]``: layer l runs iff ``mask[l]``, as
    ``x + g (layer(x) - x)``; WavLM's bias from layer 0's table for every layer; a pre-LN
    model ends with its final norm. Returns ``[T', D]``."""
    transformer = model.encoder.transformer
    features, _ = model.feature_extractor(wave[None], None)
    x = transformer._preprocess(model.encoder.feature_projection(features))
    bias = None
    first = transformer.layers[0].attention
    if getattr(first, "rel_attn_embed", None) is not None:
        bias = first.compute_bias(x.shape[1], x.shape[1])[None]
    for layer_id, layer in enumerate(transformer.layers):
        if mask is not None and not mask[layer_id]:
            continue
        out, _ = layer(x, None, position_bias=bias)
        g = 1.0 if gates is None else gates[layer_id]
        x = x + g * (out - x)
    if not transformer.layer_norm_first:
        x = transformer.layer_norm(x)
    return x[0]


def hf_layers(model, wave: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """HF's own modules on one utterance ``wave [S]`` (a base model): layer l runs iff
    ``mask[l]``; WavLM's bias from layer 0 for every layer; a pre-LN model ends with its
    final norm. Returns ``[T', D]``."""
    features = model.feature_extractor(wave[None]).transpose(1, 2)
    projected = model.feature_projection(features)
    x = projected[0] if isinstance(projected, tuple) else projected
    encoder = model.encoder
    x = x + encoder.pos_conv_embed(x)
    stable = "StableLayerNorm" in type(encoder).__name__
    if not stable:
        x = encoder.layer_norm(x)
    bias = None
    first = encoder.layers[0].attention
    if getattr(first, "rel_attn_embed", None) is not None:
        frames = x.shape[1]
        bias = first.compute_bias(frames, frames)[None].expand(1, -1, -1, -1).reshape(-1, frames, frames)
    for layer_id, layer in enumerate(encoder.layers):
        if mask is not None and not mask[layer_id]:
            continue
        if bias is None:
            x = layer(x)
        else:
            x = layer(x, position_bias=bias, index=layer_id)[0]
    return encoder.layer_norm(x)[0] if stable else x[0]
