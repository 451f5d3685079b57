"""Full depth: the static baseline and DLD's teacher. Every sample runs every layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from torch import Tensor

from ..asr import CTCModel, ctc_loss
from .base import Batch, Budget, InferenceResult, Logs, Method, ObjectiveSettings, run_masked


class StaticCTC:
    """Full-depth CTC training."""

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        log_probs, out_lengths, _ = model(features, lengths)
        loss = ctc_loss(log_probs, out_lengths, targets, target_lengths)
        return loss, {"ctc": loss.item()}


@dataclass(frozen=True)
class FullBudget(Budget):
    """Every layer for every sample (no decisions)."""


def run(model: CTCModel, x: Tensor, lengths: Tensor, budget: FullBudget) -> InferenceResult:
    return run_masked(model, x, lengths, None)


def objective(settings: ObjectiveSettings, model: CTCModel) -> StaticCTC:
    return StaticCTC()


def budgets(model: CTCModel) -> List[Tuple[str, Budget]]:
    return [("full", FullBudget())]


METHOD = Method("static", "full-depth CTC: the baseline and the DLD teacher", FullBudget, run, objective, budgets)
