"""Full depth: the static baseline and DLD's teacher. Every sample runs every layer.

With intermediate CTC heads (``ModelConfig.exit_depths``) and a weight it trains with
intermediate CTC in the style of InterCTC (Lee & Watanabe, ICASSP 2021), but each
intermediate layer has a head of its own where the paper shares the final projection: the
heads only add loss terms, inference still decodes the last layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import Tensor

from ..asr import CTCModel, ctc_loss
from ..validation import check_real
from .base import Batch, Budget, InferenceResult, Logs, Method, ObjectiveSettings, exit_ctc_losses, run_masked


def check_inter_ctc_weight(name: str, value: float) -> float:
    """``value`` as a float in ``[0, 1)``, else ``ValueError`` naming ``name`` (1 would leave the
    last layer untrained)."""
    if check_real(name, value, 0.0, 1.0) == 1.0:
        raise ValueError(f"{name} must be < 1 (1 leaves the last layer untrained), got {value}")
    return float(value)


class StaticCTC:
    """Full-depth CTC training: ``(1 - w) * CTC(last layer) + w * mean CTC(intermediate heads)``
    when the model has intermediate heads (InterCTC-style, ``w = inter_ctc_weight``), plain CTC
    otherwise.

    Args:
        inter_ctc_weight: ``w`` in ``[0, 1)``; 0 (default) leaves intermediate heads untrained,
            the InterCTC paper uses 0.3 with one head at half depth.
    """

    def __init__(self, inter_ctc_weight: float = 0.0) -> None:
        self.inter_ctc_weight = check_inter_ctc_weight("inter_ctc_weight", inter_ctc_weight)

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        if len(model.config.head_depths) == 1:
            features, lengths, targets, target_lengths = batch
            log_probs, out_lengths, _ = model(features, lengths)
            loss = ctc_loss(log_probs, out_lengths, targets, target_lengths)
            return loss, {"ctc": loss.item()}
        losses = exit_ctc_losses(model, batch)
        final = losses.pop(model.config.num_layers)
        inter = torch.stack(list(losses.values())).mean()
        loss = (1.0 - self.inter_ctc_weight) * final + self.inter_ctc_weight * inter
        return loss, {"ctc": final.item(), **{f"ctc{layer}": value.item() for layer, value in losses.items()}}


@dataclass(frozen=True)
class FullBudget(Budget):
    """Every layer for every sample (no decisions)."""


def run(model: CTCModel, x: Tensor, lengths: Tensor, budget: FullBudget) -> InferenceResult:
    return run_masked(model, x, lengths, None)


def objective(settings: ObjectiveSettings, model: CTCModel) -> StaticCTC:
    return StaticCTC(settings.inter_ctc_weight)


def budgets(model: CTCModel) -> List[Tuple[str, Budget]]:
    return [("full", FullBudget())]


METHOD = Method(
    name="static",
    summary="full-depth CTC: the baseline and the DLD teacher",
    budget_type=FullBudget,
    run=run,
    objective=objective,
    budgets=budgets,
)
