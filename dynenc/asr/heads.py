"""Output modules the CTC model owns beside the encoder: the intermediate blank head of
CTC-blank frame skipping and the input-conditioned layer selector. (The final and
early-exit heads are plain ``nn.Linear`` projections followed by a log-softmax.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import valid_frames


class BlankHead(nn.Module):
    """Intermediate CTC head ``[*, D] -> [*, V]`` log-probabilities (blank = 0).

    Factorized (*choice*): a 1-unit blank logit b and token logits z give
    ``p(blank) = sigmoid(b)`` and ``p(v) = sigmoid(-b) * softmax(z)_v``, so the skip decision
    needs only the blank projection (no softmax over the vocabulary).
    """

    def __init__(self, dim: int, vocab_size: int, factorized: bool = False) -> None:
        super().__init__()
        self.factorized = factorized
        if factorized:
            self.blank = nn.Linear(dim, 1)
            self.tokens = nn.Linear(dim, vocab_size - 1)
        else:
            self.proj = nn.Linear(dim, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        if not self.factorized:
            return F.log_softmax(self.proj(h), dim=-1)
        blank = self.blank(h)
        return torch.cat([F.logsigmoid(blank), F.logsigmoid(-blank) + F.log_softmax(self.tokens(h), dim=-1)], dim=-1)

    def blank_log_prob(self, h: Tensor) -> Tensor:
        """``log p(blank)`` ``[*]``."""
        if self.factorized:
            return F.logsigmoid(self.blank(h)).squeeze(-1)
        return self.forward(h)[..., 0]


class LayerSelector(nn.Module):
    """``[B, T, D]`` encoder inputs + lengths ``[B]`` -> ``[B, L]`` layer logits.

    Pooling (*choice*): mean and standard deviation over valid frames, then a 2-layer MLP.
    """

    def __init__(self, dim: int, num_layers: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, num_layers))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        valid = valid_frames(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)
        count = valid.sum(1).clamp_min(1)
        mean = (x * valid).sum(1) / count
        var = (((x - mean.unsqueeze(1)) ** 2) * valid).sum(1) / count
        return self.mlp(torch.cat([mean, var.clamp_min(1e-6).sqrt()], dim=-1))
