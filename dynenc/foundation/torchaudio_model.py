"""``DynamicWav2Vec2Model``: torchaudio's ``Wav2Vec2Model`` (wav2vec2, HuBERT, WavLM) with the
transformer on dynenc's routing engine, torchaudio's submodule names and calls."""

from __future__ import annotations

import copy
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import validation
from ..engine import EncoderOutput
from ..routing import valid_frames
from .encoder import DynamicTransformer
from .features import project_waveforms
from .structure import check_transformer_layers


class _Encoder(nn.Module):
    """torchaudio's ``Encoder`` container: ``feature_projection`` and ``transformer``."""

    def __init__(self, feature_projection: nn.Module, transformer: DynamicTransformer) -> None:
        super().__init__()
        self.feature_projection = feature_projection
        self.transformer = transformer


class DynamicWav2Vec2Model(nn.Module):
    """A ``torchaudio.models.Wav2Vec2Model`` whose samples and frames take different depths.

    Made by :func:`dynenc.from_torchaudio`; submodules ``feature_extractor``,
    ``encoder.feature_projection``, ``encoder.transformer`` (a
    :class:`~dynenc.foundation.DynamicTransformer`) and ``aux``, with torchaudio's parameter
    names, so ``load_state_dict`` is strict both ways.

    Unlike torchaudio, batched calls with ``lengths`` equal each utterance run alone, WavLM
    included (torchaudio's WavLM refuses ``lengths``), and the relative position bias of
    WavLM comes from layer 0's table even for samples that skip layer 0 (torchaudio loses it
    when layer 0 is dropped).
    """

    def __init__(self, feature_extractor: nn.Module, encoder: _Encoder, aux: Optional[nn.Module]) -> None:
        super().__init__()
        self.feature_extractor = feature_extractor
        self.encoder = encoder
        self.aux = aux

    @classmethod
    def from_torchaudio(cls, model: Any) -> DynamicWav2Vec2Model:
        """A dynamic copy (parameters copied) of a torchaudio ``Wav2Vec2Model``; raises naming the
        first part it cannot represent."""
        transformer = model.encoder.transformer
        layers = list(transformer.layers)
        pre_norm = check_transformer_layers(
            layers, "model.encoder.transformer.layers", lambda layer: bool(getattr(layer, "layer_norm_first", False))
        )
        if bool(transformer.layer_norm_first) == pre_norm:
            raise ValueError(
                "model.encoder.transformer.layer_norm_first must be the opposite of its layers' layer_norm_first "
                f"(as torchaudio's factories build it), got {transformer.layer_norm_first} for both"
            )
        model = copy.deepcopy(model)
        transformer = model.encoder.transformer
        first = transformer.layers[0].attention
        relative = None
        if getattr(first, "rel_attn_embed", None) is not None:
            relative = (first.num_buckets, first.max_distance)
        dynamic = DynamicTransformer(
            transformer.pos_conv_embed,
            transformer.layer_norm,
            transformer.dropout,
            list(transformer.layers),
            pre_norm,
            layer_drop=float(transformer.layer_drop),
            relative_position=relative,
        )
        return cls(model.feature_extractor, _Encoder(model.encoder.feature_projection, dynamic), model.aux)

    @property
    def transformer(self) -> DynamicTransformer:
        return self.encoder.transformer

    def embed(self, waveforms: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Everything before the layers: ``waveforms [B, S]`` -> ``(x [B, T', D], lengths [B])``
        (the input of :attr:`transformer`; pads zero)."""
        validation.check_tensor("waveforms", waveforms, dim=2, layout="[B, S]")
        if lengths is None:
            lengths = torch.full((waveforms.shape[0],), waveforms.shape[1], device=waveforms.device)
        else:
            validation.check_tensor("lengths", lengths, dim=1, layout="[B]", device=waveforms.device)
            validation.check_range([("lengths", lengths, 0, waveforms.shape[1], "S")])
        x, _, frames = project_waveforms(self.feature_extractor, self.encoder.feature_projection, waveforms, lengths)
        return self.transformer.embed(x, frames), frames

    def forward(self, waveforms: Tensor, lengths: Optional[Tensor] = None, *, return_report: bool = False, **routing):
        """torchaudio's call: ``waveforms [B, S]``, ``lengths [B]`` valid samples or None ->
        ``(x [B, T', D] or aux logits [B, T', V], lengths [B] or None)``; pads are zero.

        ``routing``: ``layer_mask`` bool ``[B, L]``, ``depth`` int ``[B]``, ``gates`` ``[B, L]``,
        ``policy`` (see :meth:`dynenc.DynamicConformer.forward`). With ``return_report`` a
        third element, the :class:`~dynenc.EncoderOutput`.
        """
        x, frames = self.embed(waveforms, lengths)
        out: EncoderOutput = self.transformer(x, frames, return_report=True, **routing)
        y = out.output
        if self.aux is not None:
            y = self.aux(y) * valid_frames(frames, y.shape[1]).unsqueeze(-1).to(y.dtype)
        result_lengths = frames if lengths is not None else None
        return (y, result_lengths, out) if return_report else (y, result_lengths)

    def extract_features(
        self, waveforms: Tensor, lengths: Optional[Tensor] = None, num_layers: Optional[int] = None, **routing
    ) -> Tuple[List[Tensor], Optional[Tensor]]:
        """torchaudio's ``extract_features``: the output ``[B, T', D]`` of each of the first
        ``num_layers`` layers (all when None; before a pre-LN model's final norm), and the
        lengths (None when ``lengths`` is None). Without routing only those layers run."""
        if num_layers is not None:
            validation.check_int("num_layers", num_layers, low=1, high=self.transformer.num_layers)
        x, frames = self.embed(waveforms, lengths)
        if num_layers is not None and not routing:
            routing = {"depth": torch.full_like(frames, num_layers)}
        out: EncoderOutput = self.transformer(x, frames, return_hidden=True, **routing)
        hidden = (out.hidden or [])[: num_layers or self.transformer.num_layers]
        return [out.packed.unpack(h) for h in hidden], (frames if lengths is not None else None)
