"""Foundation encoders for the CTC model: the architecture a checkpoint records
(``ModelConfig.upstream``), the model built from it, and a user's pre-trained torchaudio
checkpoint or Hugging Face directory to fine-tune from (``dynenc train --init-from``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from .encoder import DynamicTransformer
from .features import project_waveforms

ENCODERS = ("conformer", "wav2vec2", "hubert", "wavlm")


class WaveformFrontend(nn.Module):
    """What a wav2vec2-family model runs before its transformer: the CNN feature extractor and
    the feature projection (upstream submodules and names), and HF's SpecAugment in training
    (``masked_spec_embed``) when the model came from Hugging Face.

    ``forward(waveforms [B, S] or [B, S, 1], lengths [B]) -> (x [B, T', D], frames [B])``.
    """

    def __init__(self, feature_extractor: Any, feature_projection: nn.Module, speech_model: Any = None) -> None:
        """``speech_model``: the :class:`~dynenc.foundation.huggingface.DynamicSpeechModel` the
        parts come from (its HF config and SpecAugment), or None (torchaudio)."""
        super().__init__()
        self.feature_extractor = feature_extractor
        self.feature_projection = feature_projection
        self.config = None if speech_model is None else speech_model.config
        self._spec_augment = None if speech_model is None else speech_model._spec_augment
        if speech_model is not None and hasattr(speech_model, "masked_spec_embed"):
            self.masked_spec_embed = speech_model.masked_spec_embed

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        if waveforms.dim() == 3:
            waveforms = waveforms.squeeze(-1)
        x, _, frames = project_waveforms(self.feature_extractor, self.feature_projection, waveforms, lengths)
        if self._spec_augment is not None and self.training:
            valid = torch.arange(x.shape[1], device=x.device)[None] < frames[:, None]
            x = self._spec_augment(self, x, attention_mask=valid)
        return x, frames


def torchaudio_arguments(model: Any) -> Tuple[str, Dict[str, Any]]:
    """``(factory, keyword arguments)`` of the torchaudio factory (``wav2vec2_model`` or
    ``wavlm_model``) that builds ``model``'s architecture, read from its modules."""
    conv_layers = model.feature_extractor.conv_layers
    first_norm = conv_layers[0].layer_norm
    transformer = model.encoder.transformer
    layer = transformer.layers[0]
    attention = layer.attention
    arguments: Dict[str, Any] = dict(
        extractor_mode="group_norm" if isinstance(first_norm, nn.GroupNorm) else "layer_norm",
        extractor_conv_layer_config=[
            (block.conv.out_channels, block.conv.kernel_size[0], block.conv.stride[0]) for block in conv_layers
        ],
        extractor_conv_bias=conv_layers[0].conv.bias is not None,
        encoder_embed_dim=model.encoder.feature_projection.projection.out_features,
        encoder_projection_dropout=model.encoder.feature_projection.dropout.p,
        encoder_pos_conv_kernel=transformer.pos_conv_embed.kernel_size,
        encoder_pos_conv_groups=transformer.pos_conv_embed.conv.groups,
        encoder_num_layers=len(transformer.layers),
        encoder_num_heads=attention.num_heads,
        encoder_attention_dropout=float(attention.dropout),
        encoder_ff_interm_features=layer.feed_forward.intermediate_dense.out_features,
        encoder_ff_interm_dropout=layer.feed_forward.intermediate_dropout.p,
        encoder_dropout=layer.dropout.p,
        encoder_layer_norm_first=bool(layer.layer_norm_first),
        encoder_layer_drop=float(transformer.layer_drop),
        aux_num_out=None,
    )
    if getattr(attention, "rel_attn_embed", None) is None:
        return "wav2vec2_model", arguments
    buckets = dict(encoder_num_buckets=attention.num_buckets, encoder_max_distance=attention.max_distance)
    return "wavlm_model", {**arguments, **buckets}


def scratch_description(encoder: str, dim: int, num_heads: int, ffn_dim: int, num_layers: int, dropout: float) -> Dict:
    """The architecture of a foundation encoder trained from scratch from the CTC config's sizes:
    torchaudio's base layout (7 conv layers, 320x; a 128-wide positional convolution) with
    ``dim`` channels everywhere, post-LN."""
    factory = "wavlm_model" if encoder == "wavlm" else "wav2vec2_model"
    arguments: Dict[str, Any] = dict(
        extractor_mode="group_norm",
        extractor_conv_layer_config=[(dim, 10, 5)] + [(dim, 3, 2)] * 4 + [(dim, 2, 2)] * 2,
        extractor_conv_bias=False,
        encoder_embed_dim=dim,
        encoder_projection_dropout=dropout,
        encoder_pos_conv_kernel=128,
        encoder_pos_conv_groups=math.gcd(16, dim),
        encoder_num_layers=num_layers,
        encoder_num_heads=num_heads,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=ffn_dim,
        encoder_ff_interm_dropout=dropout,
        encoder_dropout=dropout,
        encoder_layer_norm_first=False,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )
    if factory == "wavlm_model":
        arguments.update(encoder_num_buckets=320, encoder_max_distance=800)
    return {"source": "torchaudio", "factory": factory, "arguments": arguments}


def _upstream_model(description: Dict) -> Any:
    source = description.get("source")
    if source == "torchaudio":
        import torchaudio

        arguments = dict(description["arguments"])
        arguments["extractor_conv_layer_config"] = [tuple(c) for c in arguments["extractor_conv_layer_config"]]
        return getattr(torchaudio.models, description["factory"])(**arguments)
    if source == "huggingface":
        import transformers

        config = transformers.AutoConfig.for_model(description["model_type"], **description["config"])
        return transformers.AutoModel.from_config(config)
    raise ValueError(f"ModelConfig.upstream['source'] must be 'torchaudio' or 'huggingface', got {source!r}")


def build_foundation(description: Dict) -> Tuple[WaveformFrontend, DynamicTransformer]:
    """The front-end and the dynamic transformer of the architecture ``description``
    (:func:`scratch_description`, or what :func:`load_pretrained` read), random weights."""
    return split_model(_upstream_model(description))


def split_model(upstream: Any) -> Tuple[WaveformFrontend, DynamicTransformer]:
    """A torchaudio ``Wav2Vec2Model`` or an HF base model as (front-end, dynamic transformer),
    parameters copied."""
    from . import from_huggingface, from_torchaudio

    dynamic: Any
    if hasattr(upstream, "config"):
        dynamic = from_huggingface(upstream)
        return WaveformFrontend(dynamic.feature_extractor, dynamic.feature_projection, dynamic), dynamic.encoder
    dynamic = from_torchaudio(upstream)
    return WaveformFrontend(dynamic.feature_extractor, dynamic.encoder.feature_projection, None), dynamic.transformer


def load_pretrained(path: Path, factory: str = "") -> Tuple[Dict, Any]:
    """``(architecture description, upstream model)`` of a pre-trained encoder: a Hugging Face
    directory (``save_pretrained``; a ``*ForCTC`` gives its base model), or a torchaudio
    ``Wav2Vec2Model``'s ``state_dict()`` saved with ``torch.save`` together with the name of
    the torchaudio factory that builds its architecture (``factory``: e.g. ``"wavlm_base"``, or
    a name followed by a JSON object of its keyword arguments, ``'wavlm_model {"encoder_num_layers":
    2, ...}'``; an ``aux`` head in the file is left out)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--init-from {path}: a directory must be one Hugging Face's save_pretrained wrote")
        import transformers

        model = transformers.AutoModel.from_pretrained(path)
        config = model.config.to_dict()
        description = {"source": "huggingface", "model_type": config.pop("model_type"), "config": config}
        return description, model
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no such file or directory")
    import torchaudio

    name, _, given = factory.strip().partition(" ")
    build = getattr(torchaudio.models, name, None) if name.startswith(("wav2vec2", "hubert", "wavlm")) else None
    if build is None:
        raise ValueError(
            f"--init-from {path} (a torchaudio state dict) needs --init-factory naming the torchaudio factory of "
            f"its architecture (e.g. wav2vec2_base, hubert_large, wavlm_base), got {factory!r}"
        )
    try:
        arguments = json.loads(given) if given else {}
        model = build(**arguments)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--init-factory {factory!r}: cannot build torchaudio.models.{name}: {error}") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("aux.")}, strict=True)
    except (RuntimeError, AttributeError) as error:
        raise ValueError(f"--init-from {path} is not a state dict of torchaudio.models.{name}: {error}") from None
    name, arguments = torchaudio_arguments(model)
    return {"source": "torchaudio", "factory": name, "arguments": arguments}, model
