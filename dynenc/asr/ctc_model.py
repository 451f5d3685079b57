"""``CTCModel``: front-end + encoder (``DynamicConformer`` on fbank, or a wav2vec2 / HuBERT /
WavLM ``DynamicTransformer`` on waveforms) + CTC head, plus the optional modules the methods
read (exit heads, the intermediate blank head, the layer selector)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validation
from ..engine import RoutedEncoder
from ..foundation.build import build_foundation, scratch_description
from ..model import DynamicConformer, EncoderOutput
from .config import ModelConfig
from .frontend import Conv2dSubsampling
from .heads import CTCHead, LayerSelector


class CTCModel(nn.Module):
    """A CTC speech model built from a validated :class:`~dynenc.asr.ModelConfig`.

    ``forward(features [B, T, F], lengths [B], **routing)`` returns
    ``(log_probs [B, T', V], lengths [B], EncoderOutput)``; ``routing`` goes to the encoder's
    forward (``layer_mask``, ``depth``, ``gates``, ``policy``, ``return_hidden``). For a
    foundation encoder the features are waveforms ``[B, S]`` (or ``[B, S, 1]``) at 16 kHz.
    """

    encoder: RoutedEncoder

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.encoder == "conformer":
            self.frontend: nn.Module = Conv2dSubsampling(config.num_features, config.dim)
            sizes = (config.dim, config.num_heads, config.ffn_dim, config.num_layers, config.kernel_size)
            self.encoder = DynamicConformer(*sizes, dropout=config.dropout)
        else:
            description = config.upstream or scratch_description(
                config.encoder, config.dim, config.num_heads, config.ffn_dim, config.num_layers, config.dropout
            )
            self.frontend, self.encoder = build_foundation(description)
            found = (self.encoder.input_dim, self.encoder.num_layers)
            if found != (config.dim, config.num_layers):
                raise ValueError(
                    f"ModelConfig.dim / num_layers ({config.dim}, {config.num_layers}) must be the upstream "
                    f"encoder's {found}"
                )
        # A factorized head returns log-probabilities; log_softmax of them is the identity, so
        # every caller may treat both kinds alike.
        self.ctc_head = (
            CTCHead(config.dim, config.vocab_size, factorized=True)
            if config.factorized_final_ctc
            else nn.Linear(config.dim, config.vocab_size)
        )
        self.exit_heads = nn.ModuleDict(
            {
                str(depth): nn.Linear(config.dim, config.vocab_size)
                for depth in config.exit_depths
                if depth != config.num_layers
            }
        )
        self.blank_head = (
            CTCHead(config.dim, config.vocab_size, config.factorized_ctc) if config.blank_skip_depth else None
        )
        self.selector = (
            LayerSelector(config.dim, config.num_layers, config.selector_hidden) if config.selector_hidden else None
        )

    def exit_head(self, depth: int) -> nn.Module:
        """The CTC head read after the first ``depth`` layers (the final head at the model's depth)."""
        return self.ctc_head if depth == self.config.num_layers else self.exit_heads[str(depth)]

    def embed(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """Front-end and what the encoder runs before its layers: ``[B, T, F]`` (a foundation
        encoder's waveforms ``[B, S]``) -> ``([B, T', D], lengths')`` (the layers' input)."""
        if self.config.input_features == "waveform":
            x, x_lengths = self.frontend(*self._checked_waveforms(features, lengths))
        else:
            x, x_lengths = self.frontend(*self._checked_features(features, lengths))
        return self.encoder.embed(x, x_lengths), x_lengths

    def _checked_waveforms(self, waveforms: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        validation.check_tensor("features", waveforms, layout="[B, S] waveforms")
        if waveforms.dim() == 3 and waveforms.shape[2] == 1:
            waveforms = waveforms.squeeze(2)
        if waveforms.dim() != 2:
            raise ValueError(f"features must be [B, S] (or [B, S, 1]) waveforms, got {tuple(waveforms.shape)}")
        self._check_lengths(waveforms, lengths)
        return waveforms, lengths

    def _check_lengths(self, features: Tensor, lengths: Tensor) -> None:
        validation.check_tensor("lengths", lengths, dim=1, layout="[B]", device=features.device)
        if lengths.shape[0] != features.shape[0] or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(
                f"lengths must be an integer tensor of shape ({features.shape[0]},), got "
                f"{lengths.dtype} {tuple(lengths.shape)}"
            )
        # Checked in the caller's units: the subsampled numbers would not say what was wrong.
        validation.check_range([("lengths", lengths, 0, features.shape[1], "T")])

    def _checked_features(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        validation.check_tensor("features", features, dim=3, layout=f"[B, T, {self.config.num_features}]")
        if features.shape[2] != self.config.num_features:
            raise ValueError(f"features must be [B, T, {self.config.num_features}], got {tuple(features.shape)}")
        if features.shape[1] < 7:
            raise ValueError(f"features need at least 7 frames for 4x subsampling, got {features.shape[1]}")
        self._check_lengths(features, lengths)
        return features, lengths

    def forward(self, features: Tensor, lengths: Tensor, **routing) -> Tuple[Tensor, Tensor, EncoderOutput]:
        x, x_lengths = self.embed(features, lengths)
        return self.encode(x, x_lengths, **routing)

    def rows_at_depth(self, out: EncoderOutput, depth: int) -> Tensor:
        """``[B, T', D]``: what a head reads after the first ``depth`` layers of a forward that
        kept its hidden rows (the encoder's :meth:`~dynenc.engine.RoutedEncoder.finish_rows`
        applied, e.g. a pre-LN model's final norm), pads zero."""
        if out.hidden is None:
            raise ValueError("rows_at_depth needs a forward with return_hidden=True")
        return out.packed.unpack(self.encoder.finish_rows(out.hidden[depth - 1], out.packed.batch))

    def encode(self, x: Tensor, lengths: Tensor, **routing) -> Tuple[Tensor, Tensor, EncoderOutput]:
        """Encoder + final CTC head on already embedded ``x [B, T', D]``."""
        out = self.encoder(x, lengths, return_report=True, **routing)
        return F.log_softmax(self.ctc_head(out.output), dim=-1), lengths, out
