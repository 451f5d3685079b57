"""Output modules the CTC model owns beside the encoder: the (optionally factorized) CTC head
that CTC-blank frame skipping reads p(blank) from, and the input-conditioned layer selector.
(The early-exit heads and an unfactorized final head are plain ``nn.Linear`` projections
followed by a log-softmax.)"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import valid_frames


class CTCHead(nn.Module):
    """CTC head ``[*, D] -> [*, V]`` log-probabilities (blank = 0) that also reads ``log p(blank)``
    alone: the blank-skip model's intermediate head, and its final head when that is factorized.

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
    """``[B, T, D]`` encoder inputs + lengths ``[B]`` + budget k -> ``[B, L]`` layer logits.

    Pooling (*choice*): mean and standard deviation over valid frames; the budget enters as the
    fraction ``k / L`` beside them (*choice*: one selector serves every k coherently, and the
    budget regulariser has a target the selector can see); then a 2-layer MLP.
    """

    def __init__(self, dim: int, num_layers: int, hidden: int = 64) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.mlp = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.ReLU(), nn.Linear(hidden, num_layers))

    def forward(self, x: Tensor, lengths: Tensor, k: Union[int, Tensor]) -> Tensor:
        """``k``: the number of layers to select, an int or int ``[B]`` in ``[0, L]``."""
        valid = valid_frames(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)
        count = valid.sum(1).clamp_min(1)
        mean = (x * valid).sum(1) / count
        var = (((x - mean.unsqueeze(1)) ** 2) * valid).sum(1) / count
        budget = torch.as_tensor(k, dtype=x.dtype, device=x.device).expand(x.shape[0]).unsqueeze(1) / self.num_layers
        return self.mlp(torch.cat([mean, var.clamp_min(1e-6).sqrt(), budget], dim=-1))
