"""Early exits (arXiv 2309.09546): CTC heads after some layers; at inference a sample leaves
the batch at the first exit whose confidence passes a threshold (or at a fixed exit)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..asr import CTCModel, ctc_loss
from ..config import ModelConfig
from ..routing import Schedule
from ..validation import check_int, check_real
from .base import Batch, Budget, Decisions, InferenceResult, Logs, Method, ObjectiveSettings, require_one_of

CRITERIA = ("max_prob", "entropy")


def frame_confidence(log_probs: Tensor, criterion: str) -> Tensor:
    """Per-frame confidence ``[*]`` of posteriors ``[*, V]``: the max posterior (in (0, 1]),
    or the negative entropy ``sum_v p log p`` (<= 0)."""
    if criterion == "max_prob":
        return log_probs.max(-1).values.exp()
    if criterion == "entropy":
        return (log_probs.exp() * log_probs).sum(-1)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


@dataclass(frozen=True)
class EarlyExitBudget(Budget):
    """Exactly one of: ``threshold`` (a sample exits at the first exit whose mean frame
    confidence under ``criterion`` reaches it: in [0, 1] for ``max_prob``, <= 0 for
    ``entropy``) or ``fixed_exit`` (every sample exits after that 1-based exit layer)."""

    threshold: Optional[float] = None
    criterion: str = "max_prob"
    fixed_exit: Optional[int] = None

    def __post_init__(self) -> None:
        require_one_of("EarlyExitBudget", threshold=self.threshold, fixed_exit=self.fixed_exit)
        if self.criterion not in CRITERIA:
            raise ValueError(f"EarlyExitBudget.criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.fixed_exit is not None:
            check_int("EarlyExitBudget.fixed_exit", self.fixed_exit, low=1)
            return
        check_real("EarlyExitBudget.threshold", self.threshold)
        in_range = 0 <= self.threshold <= 1 if self.criterion == "max_prob" else self.threshold <= 0
        if not in_range:
            expected = "[0, 1]" if self.criterion == "max_prob" else "(-inf, 0] (a negative entropy)"
            raise ValueError(f"EarlyExitBudget.threshold must lie in {expected} for criterion {self.criterion!r}, "
                             f"got {self.threshold}")

    def check(self, model: CTCModel) -> None:
        exits = model.config.exit_set
        if self.fixed_exit is not None and self.fixed_exit not in exits:
            raise ValueError(f"EarlyExitBudget.fixed_exit must be one of the model's exit layers {list(exits)}, "
                             f"got {self.fixed_exit}")
        if self.threshold is not None and len(exits) == 1:
            raise ValueError("an EarlyExitBudget with a threshold needs a model with early-exit heads "
                             "(ModelConfig.exit_layers)")


@dataclass(frozen=True)
class ExitDecision:
    """After one exit layer: ``exits`` bool ``[B]`` (packed order) the samples that stop
    there, and ``log_probs [N, V]`` that exit head's posteriors (the exiting rows are read)."""

    exits: Tensor
    log_probs: Tensor


@dataclass(frozen=True, eq=False)
class EarlyExitPolicy:
    """Routing policy: after each exit layer, samples whose mean frame confidence reaches the
    threshold (or every sample, at a fixed exit) stop; their rows leave the batch. Needs a
    schedule with a ``sample_mask``."""

    model: CTCModel
    budget: EarlyExitBudget

    @property
    def decision_layers(self) -> Tuple[int, ...]:
        num_layers, fixed = self.model.config.num_layers, self.budget.fixed_exit
        return tuple(e - 1 for e in self.model.config.exit_set if e < num_layers and fixed in (None, e))

    def decide(self, layer: int, x: Tensor, schedule: Schedule) -> Tuple[Schedule, ExitDecision]:
        with torch.profiler.record_function("dynenc.early_exit"):
            batch = schedule.batch
            log_probs = F.log_softmax(self.model.exit_head(layer + 1)(x), dim=-1)
            running = schedule.sample_mask[:, layer + 1:].any(1)
            if self.budget.fixed_exit is not None:
                exits = running
            else:
                confidence = frame_confidence(log_probs, self.budget.criterion)
                total = x.new_zeros(batch.num_seqs).index_add_(0, batch.seq_ids, confidence)
                exits = running & (total / batch.lengths.clamp_min(1) >= self.budget.threshold)
            mask = schedule.sample_mask.clone()
            mask[:, layer + 1:] &= ~exits.unsqueeze(1)
        return schedule.replace(sample_mask=mask), ExitDecision(exits, log_probs)


def run(model: CTCModel, x: Tensor, lengths: Tensor, budget: EarlyExitBudget) -> InferenceResult:
    """Each sample's posteriors come from the head it exited at."""
    batch_size, num_layers = x.shape[0], model.config.num_layers
    everything = torch.ones(batch_size, num_layers, dtype=torch.bool, device=x.device)
    log_probs, _, out = model.encode(x, lengths, layer_mask=everything, policy=EarlyExitPolicy(model, budget))
    exit_layer = torch.full((batch_size,), num_layers, dtype=torch.int64, device=x.device)  # packed order
    if not out.decisions:
        return InferenceResult(log_probs, lengths, out.report, Decisions(exit_layer=exit_layer))
    exit_rows = x.new_zeros(out.packed.batch.num_rows, model.config.vocab_size)
    for layer, decision in sorted(out.decisions.items()):
        exit_rows = torch.where(decision.exits.index_select(0, out.packed.batch.seq_ids).unsqueeze(1),
                                decision.log_probs, exit_rows)
        exit_layer = torch.where(decision.exits, layer + 1, exit_layer)
    exit_layer = out.packed.to_sample_order(exit_layer)
    early = (exit_layer < num_layers)[:, None, None]
    log_probs = torch.where(early, out.packed.unpack(exit_rows), log_probs)
    return InferenceResult(log_probs, lengths, out.report, Decisions(exit_layer=exit_layer))


class EarlyExitObjective:
    """Weighted sum of the CTC losses of every exit head (weight 1 unless ``weights`` says
    otherwise; full-depth forward, hidden states read at each exit layer)."""

    def __init__(self, weights: Optional[Dict[int, float]] = None) -> None:
        self.weights = weights or {}

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        x, x_lengths = model.embed(features, lengths)
        out = model.encoder(x, x_lengths, return_hidden=True)
        loss, logs = 0.0, {}
        for layer in model.config.exit_set:
            hidden = out.packed.unpack(out.hidden[layer - 1])
            log_probs = F.log_softmax(model.exit_head(layer)(hidden), dim=-1)
            exit_loss = ctc_loss(log_probs, x_lengths, targets, target_lengths)
            loss = loss + self.weights.get(layer, 1.0) * exit_loss
            logs[f"ctc{layer}"] = exit_loss.item()
        return loss, logs


def budgets(model: CTCModel) -> List[Tuple[str, Budget]]:
    """Every fixed exit, then (with exits before the last layer) confidence thresholds of both criteria."""
    fixed = [(f"exit={e}", EarlyExitBudget(fixed_exit=e)) for e in model.config.exit_set]
    if len(model.config.exit_set) == 1:
        return fixed
    return fixed + [(f"{criterion} thr={t}", EarlyExitBudget(threshold=t, criterion=criterion))
                    for criterion, values in (("max_prob", (0.99, 0.97, 0.95, 0.9, 0.8)),
                                              ("entropy", (-0.05, -0.1, -0.2, -0.4)))
                    for t in values]


def objective(settings: ObjectiveSettings, model: CTCModel) -> EarlyExitObjective:
    return EarlyExitObjective()


def model_fields(config: ModelConfig) -> Dict[str, Any]:
    """Exit heads after every second layer unless the config names its exits."""
    return {} if config.exit_layers else {"exit_layers": tuple(range(2, config.num_layers + 1, 2))}


METHOD = Method("early_exit", "early exits: CTC heads after every second layer", EarlyExitBudget, run, objective,
                budgets, model_fields)
