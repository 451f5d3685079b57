"""Early exits: CTC heads after some layers; at inference a sample leaves the batch at the
first exit whose confidence passes a threshold (or at a fixed exit)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..routing import Schedule

CRITERIA = ("max_prob", "entropy")


def frame_confidence(log_probs: Tensor, criterion: str) -> Tensor:
    """Per-frame confidence ``[*]`` of posteriors ``[*, V]``: the max posterior, or the
    negative entropy."""
    if criterion == "max_prob":
        return log_probs.max(-1).values.exp()
    if criterion == "entropy":
        return (log_probs.exp() * log_probs).sum(-1)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


class EarlyExitPolicy:
    """Routing policy: after each exit layer, samples whose mean frame confidence reaches
    ``threshold`` (or every sample, at ``fixed_exit``) stop; their rows leave the batch.

    Needs a schedule with a ``sample_mask``. After the forward: ``exit_layer`` int64 ``[B]``
    (packed order; L for samples that ran to the end) and ``log_probs`` ``[N, V]`` rows of
    the exit head each sample left at (rows of samples that never exited are unset).
    """

    def __init__(self, model, threshold: Optional[float] = None, criterion: str = "max_prob",
                 fixed_exit: Optional[int] = None) -> None:
        exits = sorted(set(model.config.exit_layers) - {model.config.num_layers})
        if (threshold is None) == (fixed_exit is None):
            raise ValueError("pass exactly one of threshold and fixed_exit")
        if fixed_exit is not None and fixed_exit not in exits + [model.config.num_layers]:
            raise ValueError(f"fixed_exit must be one of the exit layers {exits + [model.config.num_layers]}, got {fixed_exit}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.model = model
        self.threshold = threshold
        self.criterion = criterion
        self.fixed_exit = fixed_exit
        chosen = exits if fixed_exit is None else [e for e in exits if e == fixed_exit]
        self.decision_layers = tuple(e - 1 for e in chosen)
        self.exit_layer: Optional[Tensor] = None
        self.log_probs: Optional[Tensor] = None

    def decide(self, layer: int, x: Tensor, schedule: Schedule) -> Schedule:
        with torch.profiler.record_function("dynenc.early_exit"):
            batch = schedule.batch
            num_seqs = batch.cu_seqlens.numel() - 1
            if self.exit_layer is None:
                self.exit_layer = torch.full((num_seqs,), self.model.config.num_layers, device=x.device)
                self.log_probs = x.new_zeros(x.shape[0], self.model.config.vocab_size)
            log_probs = F.log_softmax(self.model.exit_head(layer + 1)(x), dim=-1)
            running = schedule.sample_mask[:, layer + 1:].any(1)
            if self.fixed_exit is not None:
                exits = running
            else:
                conf = x.new_zeros(num_seqs).index_add_(0, batch.seq_ids, frame_confidence(log_probs, self.criterion))
                exits = running & (conf / batch.lengths.clamp_min(1) >= self.threshold)
            rows = exits.index_select(0, batch.seq_ids).unsqueeze(1)
            self.log_probs = torch.where(rows, log_probs, self.log_probs)
            self.exit_layer = torch.where(exits, layer + 1, self.exit_layer)
            mask = schedule.sample_mask.clone()
            mask[:, layer + 1:] &= ~exits.unsqueeze(1)
        return schedule.replace(sample_mask=mask)
