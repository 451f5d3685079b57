"""Hugging Face's ``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel`` and their ``*ForCTC``
with the transformer on dynenc's routing engine: HF's submodule names (state dicts load
strictly both ways), HF's call, dynenc's routing keywords."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import ModelOutput

from .. import validation
from ..engine import EncoderOutput
from ..routing import valid_frames
from .encoder import DynamicTransformer
from .features import project_waveforms
from .structure import check_transformer_layers

#: The HF classes :func:`from_huggingface` converts (a layer's pre-LN placement is read from its class name).
BASE_MODELS = ("Wav2Vec2Model", "HubertModel", "WavLMModel")
CTC_MODELS = ("Wav2Vec2ForCTC", "HubertForCTC", "WavLMForCTC")


@dataclass
class DynamicBaseModelOutput(ModelOutput):
    """HF's base model output plus dynenc's: ``last_hidden_state [B, T', D]`` (pads zero),
    ``extract_features [B, T', C]``, ``hidden_states`` (L + 1 padded ``[B, T', D]``, as HF's)
    when asked, ``lengths [B]`` valid frames, and ``encoder_output`` (the routes and the
    executed-work report) when ``return_report``."""

    last_hidden_state: Optional[Tensor] = None
    extract_features: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    lengths: Optional[Tensor] = None
    encoder_output: Optional[EncoderOutput] = None


@dataclass
class DynamicCTCOutput(ModelOutput):
    """HF's CTC output plus dynenc's: ``loss`` (with ``labels``), ``logits [B, T', V]`` (pads
    zero), ``hidden_states``, ``lengths [B]`` and ``encoder_output`` as in
    :class:`DynamicBaseModelOutput`."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    lengths: Optional[Tensor] = None
    encoder_output: Optional[EncoderOutput] = None


def _transformer(encoder: Any, config: Any) -> DynamicTransformer:
    layers = list(encoder.layers)
    pre_norm = check_transformer_layers(
        layers, "model.encoder.layers", lambda layer: "StableLayerNorm" in type(layer).__name__
    )
    first = layers[0].attention
    relative = None
    if getattr(first, "rel_attn_embed", None) is not None:
        relative = (first.num_buckets, first.max_distance)
    return DynamicTransformer(
        encoder.pos_conv_embed,
        encoder.layer_norm,
        encoder.dropout,
        layers,
        pre_norm,
        layer_drop=float(config.layerdrop),
        first_layer_kept=relative is not None,  # HF's WavLM never drops layer 0
        relative_position=relative,
    )


class DynamicSpeechModel(nn.Module):
    """A Hugging Face ``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel`` whose samples and
    frames take different depths (made by :func:`dynenc.from_huggingface`).

    Submodules as HF's: ``feature_extractor``, ``feature_projection``, ``masked_spec_embed``
    (when the config has SpecAugment), ``encoder`` (a
    :class:`~dynenc.foundation.DynamicTransformer`). ``config`` is the HF config.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        if getattr(model, "adapter", None) is not None:
            raise ValueError("config.add_adapter=True is not supported: the adapter's strided convolutions are HF's")
        self.config = model.config
        self._spec_augment = type(model)._mask_hidden_states  # HF's SpecAugment, called on this module
        self.feature_extractor = model.feature_extractor
        self.feature_projection = model.feature_projection
        if "masked_spec_embed" in dict(model.named_parameters(recurse=False)):
            self.masked_spec_embed = model.masked_spec_embed
        self.encoder = _transformer(model.encoder, model.config)

    def freeze_feature_encoder(self) -> None:
        """No gradient for the CNN feature extractor (HF's ``freeze_feature_encoder``)."""
        self.feature_extractor.requires_grad_(False)

    def forward(
        self,
        input_values: Tensor,
        attention_mask: Optional[Tensor] = None,
        mask_time_indices: Optional[Tensor] = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        *,
        return_report: bool = False,
        **routing,
    ):
        """HF's call on ``input_values [B, S]`` with ``attention_mask [B, S]`` (1 = sample, 0 =
        right padding) or None; ``routing``: ``layer_mask``, ``depth``, ``gates``, ``policy``
        (see :meth:`dynenc.DynamicConformer.forward`). Returns a
        :class:`DynamicBaseModelOutput` (a tuple when ``return_dict`` is False)."""
        out, extract, lengths, encoded = self._encode(
            input_values, attention_mask, mask_time_indices, output_hidden_states, routing
        )
        result = DynamicBaseModelOutput(out.output, extract, encoded, lengths, out if return_report else None)
        return result if return_dict else result.to_tuple()

    def _encode(self, input_values, attention_mask, mask_time_indices, output_hidden_states, routing):
        validation.check_tensor("input_values", input_values, dim=2, layout="[B, S]")
        batch_size, samples = input_values.shape
        if attention_mask is None:
            lengths = torch.full((batch_size,), samples, dtype=torch.int64, device=input_values.device)
        else:
            validation.check_tensor(
                "attention_mask", attention_mask, dim=2, layout="[B, S]", device=input_values.device
            )
            if tuple(attention_mask.shape) != (batch_size, samples):
                raise ValueError(
                    f"attention_mask must have shape ({batch_size}, {samples}), got {tuple(attention_mask.shape)}"
                )
            lengths = attention_mask.to(torch.int64).sum(-1)
            if not torch.equal(attention_mask.bool(), valid_frames(lengths, samples)):
                raise ValueError("attention_mask must mark each waveform's samples with 1 and its right padding with 0")
        parts = (self.feature_extractor, self.feature_projection)
        hidden, extract, frames = project_waveforms(*parts, input_values, lengths)
        frame_mask = None if attention_mask is None else valid_frames(frames, hidden.shape[1])
        hidden = self._spec_augment(self, hidden, mask_time_indices=mask_time_indices, attention_mask=frame_mask)
        x = self.encoder.embed(hidden, frames)
        out: EncoderOutput = self.encoder(x, frames, return_report=True, return_hidden=output_hidden_states, **routing)
        encoded = None
        if output_hidden_states:
            encoded = (x, *(out.packed.unpack(h) for h in out.hidden or []))
        return out, extract, frames, encoded


class DynamicSpeechModelForCTC(nn.Module):
    """HF's ``*ForCTC`` (wav2vec2, HuBERT, WavLM) on a :class:`DynamicSpeechModel`: the base
    model under HF's prefix (``wav2vec2`` / ``hubert`` / ``wavlm``), ``dropout``, ``lm_head``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.config = model.config
        self.base_model_prefix = model.base_model_prefix
        self.add_module(model.base_model_prefix, DynamicSpeechModel(getattr(model, model.base_model_prefix)))
        self.dropout = model.dropout
        self.lm_head = model.lm_head

    @property
    def speech_model(self) -> DynamicSpeechModel:
        return getattr(self, self.base_model_prefix)

    def freeze_feature_encoder(self) -> None:
        self.speech_model.freeze_feature_encoder()

    def forward(
        self,
        input_values: Tensor,
        attention_mask: Optional[Tensor] = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        labels: Optional[Tensor] = None,
        *,
        return_report: bool = False,
        **routing,
    ):
        """HF's ``*ForCTC`` call: ``logits [B, T', V]`` (pads zero) and, with ``labels [B, U]``
        (padding -100), HF's CTC loss (``config.ctc_loss_reduction``, ``ctc_zero_infinity``,
        blank = ``pad_token_id``). Returns a :class:`DynamicCTCOutput`."""
        out, _, lengths, encoded = self.speech_model._encode(
            input_values, attention_mask, None, output_hidden_states, routing
        )
        logits = self.lm_head(self.dropout(out.output))
        logits = logits * valid_frames(lengths, logits.shape[1]).unsqueeze(-1).to(logits.dtype)
        loss = None if labels is None else self._ctc_loss(logits, lengths, labels)
        result = DynamicCTCOutput(loss, logits, encoded, lengths, out if return_report else None)
        return result if return_dict else result.to_tuple()

    def _ctc_loss(self, logits: Tensor, lengths: Tensor, labels: Tensor) -> Tensor:
        config = self.config
        if labels.max() >= config.vocab_size:
            raise ValueError(f"labels must be < config.vocab_size ({config.vocab_size}), got {int(labels.max())}")
        mask = labels >= 0
        log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):
            return F.ctc_loss(
                log_probs,
                labels.masked_select(mask),
                lengths,
                mask.sum(-1),
                blank=config.pad_token_id,
                reduction=config.ctc_loss_reduction,
                zero_infinity=config.ctc_zero_infinity,
            )


def from_huggingface(model: Any) -> nn.Module:
    """A dynamic copy (parameters copied) of a Hugging Face ``Wav2Vec2Model`` / ``HubertModel`` /
    ``WavLMModel`` or their ``*ForCTC``, with HF's state-dict keys; raises naming the first
    setting or part it cannot represent."""
    known = [c.__name__ for c in type(model).__mro__ if c.__name__ in BASE_MODELS + CTC_MODELS]
    if not known:
        raise TypeError(
            f"model must be one of HF's {', '.join(BASE_MODELS + CTC_MODELS)} (or a subclass), "
            f"got {type(model).__name__}"
        )
    model = copy.deepcopy(model)
    return DynamicSpeechModelForCTC(model) if known[0] in CTC_MODELS else DynamicSpeechModel(model)
