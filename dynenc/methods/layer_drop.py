"""Random layer dropping (LD): Bernoulli keep masks drawn with torch's RNG on the device for
training; a fixed number n of layers at inference (evenly spaced, the first n, or random)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..asr import CTCModel, ctc_loss
from ..validation import check_int
from .base import Batch, Budget, InferenceResult, Logs, Method, ObjectiveSettings, run_masked

STRATEGIES = ("every_other", "first", "random")
GATINGS = ("per_sample", "per_batch")


def linear_drop_schedule(num_layers: int, p_max: float) -> Tensor:
    """NeMo-style schedule: layer l (0-based) drops with probability ``p_max * (l + 1) / L``."""
    return p_max * torch.arange(1, num_layers + 1, dtype=torch.float32) / num_layers


def check_gating(name: str, gating: str) -> None:
    """``gating`` is one of :data:`GATINGS` (the ValueError names the field ``name``)."""
    if gating not in GATINGS:
        raise ValueError(f"{name} must be one of {GATINGS}, got {gating!r}")


class RandomLayerDrop:
    """Bernoulli layer gates, one draw per (sample, layer) or per layer for the whole batch.

    Args:
        num_layers: L.
        p: drop probability: a scalar, or one per layer (e.g. :func:`linear_drop_schedule`).
        gating: ``"per_sample"`` (default, our choice: a sample's dropped layers are compute
            saved for that sample) or ``"per_batch"`` (one mask for the whole batch, the
            default of the authors' LD code).
    """

    def __init__(
        self, num_layers: int, p: Union[float, Sequence[float], Tensor] = 0.5, gating: str = "per_sample"
    ) -> None:
        check_gating("RandomLayerDrop.gating", gating)
        probs = torch.as_tensor(p, dtype=torch.float32).flatten()
        if probs.numel() == 1:
            probs = probs.expand(num_layers)
        if probs.numel() != num_layers:
            raise ValueError(f"p must be a scalar or have {num_layers} entries (one per layer), got {probs.numel()}")
        if not ((probs >= 0) & (probs <= 1)).all():  # NaN fails too
            raise ValueError(f"p must lie in [0, 1], got {probs.tolist()}")
        self.num_layers = num_layers
        self.drop_prob = probs.clone()
        self.gating = gating

    def sample(self, batch_size: int, device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
        """bool ``[B, L]`` keep mask (True = the layer runs for that sample)."""
        rows = batch_size if self.gating == "per_sample" else 1
        uniform = torch.rand(rows, self.num_layers, device=device, generator=generator)
        return (uniform >= self.drop_prob.to(device)).expand(batch_size, -1)


def fixed_layers_mask(
    num_layers: int,
    n: int,
    batch_size: int,
    strategy: str = "every_other",
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """bool ``[B, L]`` masks running exactly ``n`` layers per sample.

    Strategies: ``"every_other"`` (evenly spaced layers, always including the last one, so
    n = L/2 keeps every other layer), ``"first"`` (layers 1..n) and ``"random"`` (a random
    subset per sample, torch RNG).
    """
    if not 0 <= n <= num_layers:
        raise ValueError(f"n must lie in [0, {num_layers}], got {n}")
    if strategy == "random":
        scores = torch.rand(batch_size, num_layers, device=device, generator=generator)
        chosen = scores.topk(n, dim=1).indices
        return torch.zeros(batch_size, num_layers, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    mask = torch.zeros(num_layers, dtype=torch.bool, device=device)
    if strategy == "every_other":
        # Counting down from the last layer in steps of L / n >= 1 (distinct layers).
        mask[num_layers - 1 - (torch.arange(n) * num_layers) // max(n, 1)] = True
    elif strategy == "first":
        mask[:n] = True
    else:
        raise ValueError(f"strategy must be 'every_other', 'first' or 'random', got {strategy!r}")
    return mask.expand(batch_size, -1)


class LayerDropCTC:
    """CTC with random layer dropping: Bernoulli keep masks from torch's RNG on the device,
    drop probability ``drop_prob`` (default 0.5: the authors'), ``gating`` as in
    :class:`RandomLayerDrop` (default ``"per_sample"``: our choice; the authors' code
    draws ``"per_batch"``)."""

    def __init__(self, num_layers: int, drop_prob: Union[float, Tensor] = 0.5, gating: str = "per_sample") -> None:
        self.dropper = RandomLayerDrop(num_layers, drop_prob, gating)

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        mask = self.dropper.sample(features.shape[0], features.device)
        log_probs, out_lengths, _ = model(features, lengths, layer_mask=mask)
        loss = ctc_loss(log_probs, out_lengths, targets, target_lengths)
        return loss, {"ctc": loss.item(), "kept": mask.float().mean().item()}


@dataclass(frozen=True)
class LayerDropBudget(Budget):
    """Run ``layers`` (n in ``[0, L]``) layers per sample, chosen by ``strategy``
    (``every_other`` / ``first`` / ``random``; see :func:`fixed_layers_mask`)."""

    layers: int
    strategy: str = "every_other"

    def __post_init__(self) -> None:
        check_int("LayerDropBudget.layers", self.layers, low=0)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"LayerDropBudget.strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    def check(self, model: CTCModel) -> None:
        check_int("LayerDropBudget.layers", self.layers, low=0, high=model.config.num_layers)


def run(model: CTCModel, x: Tensor, lengths: Tensor, budget: LayerDropBudget) -> InferenceResult:
    mask = fixed_layers_mask(model.config.num_layers, budget.layers, x.shape[0], budget.strategy, x.device)
    return run_masked(model, x, lengths, mask)


def budgets(model: CTCModel) -> List[Tuple[str, Budget]]:
    """n = L..1 evenly spaced, then n = L-1..1 random subsets."""
    num_layers = model.config.num_layers
    every_other: List[Tuple[str, Budget]] = [(f"n={n}", LayerDropBudget(n)) for n in range(num_layers, 0, -1)]
    return every_other + [(f"n={n} random", LayerDropBudget(n, "random")) for n in range(num_layers - 1, 0, -1)]


def objective(settings: ObjectiveSettings, model: CTCModel) -> LayerDropCTC:
    return LayerDropCTC(model.config.num_layers, settings.drop_prob, settings.gating)


METHOD = Method(
    name="layer_drop",
    summary="random layer dropping (per-sample or per-batch Bernoulli gates)",
    budget_type=LayerDropBudget,
    run=run,
    objective=objective,
    budgets=budgets,
    chooses_layers=True,
)
