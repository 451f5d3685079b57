"""CTC-blank frame skipping: an intermediate CTC head at layer K scores p(blank) per frame;
frames with p(blank) > tau leave the sequence for layers K+1..L unless they lie within w
frames of a non-blank frame (spike extension)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..routing import Schedule, VarlenBatch


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


def dilate_within_sequences(mask: Tensor, batch: VarlenBatch, window: int) -> Tensor:
    """bool ``[N]``: rows within ``window`` rows of a True row of the same sequence."""
    if window == 0:
        return mask
    weight = torch.ones(1, 2 * window + 1, dtype=torch.float32, device=mask.device)
    return ops.varlen_dwconv1d(mask.float().unsqueeze(1), batch.cu_seqlens, weight)[:, 0] > 0.5


class BlankSkipPolicy:
    """Routing policy: after layer K (1-based), keep only non-blank frames (+ spike extension).

    After the forward, ``skipped`` is the bool ``[N]`` packed-row mask of frames that left.
    """

    def __init__(self, head: BlankHead, layer: int, threshold: float, spike_window: int = 1) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"blank threshold must lie in (0, 1], got {threshold}")
        if spike_window < 0:
            raise ValueError(f"spike_window must be >= 0, got {spike_window}")
        self.head = head
        self.decision_layers = (layer - 1,)
        self.threshold = threshold
        self.spike_window = spike_window
        self.skipped: Optional[Tensor] = None

    def decide(self, layer: int, x: Tensor, schedule: Schedule) -> Schedule:
        with torch.profiler.record_function("dynenc.blank_skip"):
            nonblank = self.head.blank_log_prob(x).exp() <= self.threshold
            keep = dilate_within_sequences(nonblank, schedule.batch, self.spike_window)
            if schedule.row_alive is not None:
                keep = keep & schedule.row_alive
            self.skipped = ~keep
        return schedule.replace(row_alive=keep)
