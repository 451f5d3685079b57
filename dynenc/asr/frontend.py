"""The convolutional front-end of the CTC model: 4x time subsampling of fbank features."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


class Conv2dSubsampling(nn.Module):
    """``[B, T, F]`` features -> ``[B, T', D]`` with ``T' = ((T - 1) // 2 - 1) // 2``.

    Two 3x3 stride-2 convolutions (valid padding, so output frames depend only on valid
    input frames) and a linear projection.
    """

    def __init__(self, num_features: int, dim: int, channels: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU()
        )
        freq = ((num_features - 1) // 2 - 1) // 2
        self.proj = nn.Linear(channels * freq, dim)

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        return torch.div(torch.div(lengths - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor")

    def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.conv(features.unsqueeze(1))  # [B, C, T', F']
        h = self.proj(h.permute(0, 2, 1, 3).flatten(2))
        # An utterance shorter than the front-end's receptive field (7 frames) has no output frame.
        return h, self.output_lengths(lengths).clamp_min(0)
