"""``CTCModel``: front-end + ``DynamicConformer`` + CTC head, plus the optional modules
the methods read (exit heads, the intermediate blank head, the layer selector)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validation
from ..model import DynamicConformer, EncoderOutput
from .config import ModelConfig
from .frontend import Conv2dSubsampling
from .heads import CTCHead, LayerSelector


class CTCModel(nn.Module):
    """A CTC speech model built from a validated :class:`~dynenc.asr.ModelConfig`.

    ``forward(features [B, T, F], lengths [B], **routing)`` returns
    ``(log_probs [B, T', V], lengths [B], EncoderOutput)``; ``routing`` goes to
    :meth:`DynamicConformer.forward` (``layer_mask``, ``depth``, ``gates``, ``policy``,
    ``return_hidden``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.frontend = Conv2dSubsampling(config.num_features, config.dim)
        self.encoder = DynamicConformer(
            config.dim, config.num_heads, config.ffn_dim, config.num_layers, config.kernel_size, dropout=config.dropout
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
        """Front-end: ``[B, T, F]`` -> ``([B, T', D], lengths')`` (the encoder's input)."""
        validation.check_tensor("features", features, dim=3, layout=f"[B, T, {self.config.num_features}]")
        if features.shape[2] != self.config.num_features:
            raise ValueError(f"features must be [B, T, {self.config.num_features}], got {tuple(features.shape)}")
        if features.shape[1] < 7:
            raise ValueError(f"features need at least 7 frames for 4x subsampling, got {features.shape[1]}")
        validation.check_tensor("lengths", lengths, dim=1, layout="[B]", device=features.device)
        if lengths.shape[0] != features.shape[0] or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(
                f"lengths must be an integer tensor of shape ({features.shape[0]},), got "
                f"{lengths.dtype} {tuple(lengths.shape)}"
            )
        # Checked in the caller's units: the subsampled numbers would not say what was wrong.
        validation.check_range([("lengths", lengths, 0, features.shape[1], "T")])
        return self.frontend(features, lengths)

    def forward(self, features: Tensor, lengths: Tensor, **routing) -> Tuple[Tensor, Tensor, EncoderOutput]:
        x, x_lengths = self.embed(features, lengths)
        return self.encode(x, x_lengths, **routing)

    def encode(self, x: Tensor, lengths: Tensor, **routing) -> Tuple[Tensor, Tensor, EncoderOutput]:
        """Encoder + final CTC head on already embedded ``x [B, T', D]``."""
        out = self.encoder(x, lengths, return_report=True, **routing)
        return F.log_softmax(self.ctc_head(out.output), dim=-1), lengths, out
