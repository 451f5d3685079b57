"""``train``: one training step (forward + backward, no optimizer) with per-sample layer
dropping against full depth, and with activation checkpointing; step time and saved
activations."""
from __future__ import annotations

from typing import Callable, List

from torch import Tensor

from dynenc import DynamicConformer

from ..harness import Prepared, TrainStep
from ..workload import BenchConfig, Workload, masked_forward, valid_mean_square
from .base import Builder, Case, Figure, Ratio


def _checkpointed(model: DynamicConformer, loss: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``loss`` with ``model.checkpoint_layers`` on during its forward (the model is shared by
    the cases; the backward recomputes without reading the flag)."""
    def run() -> Tensor:
        model.checkpoint_layers = True
        try:
            return loss()
        finally:
            model.checkpoint_layers = False

    return run


def _step(peer: str, fraction: float, checkpoint_layers: bool = False) -> Builder:
    def build(w: Workload) -> Prepared:
        static, dynamic = w.models
        x, lengths = w.input
        mask = w.drop_mask(fraction)
        if peer == "torchaudio":
            module, loss = static, lambda: valid_mean_square(static(x, lengths)[0], lengths)
        elif peer == "masked":
            module, loss = static, lambda: valid_mean_square(masked_forward(static, x, lengths, mask), lengths)
        else:
            routing = {} if fraction >= 1 else dict(layer_mask=mask)
            module, loss = dynamic, lambda: valid_mean_square(dynamic(x, lengths, **routing)[0], lengths)
        if checkpoint_layers:
            loss = _checkpointed(dynamic, loss)
        step = TrainStep(loss, [module], w.device)
        active = 1.0 if fraction >= 1 else w.token_fraction(mask)
        computed = active if peer == "dynenc" else w.padded_fraction
        return Prepared(step, dict(active=active, computed=computed, saved_mb=step.saved_bytes() / 2**20))

    return build


def cases(config: BenchConfig) -> List[Case]:
    """Each sample its own random half of the layers, against full depth. The masked peer
    (a padded full-depth step whatever f: the forward figure shows it saves nothing) in a
    full run only."""
    result = [Case("train", "torchaudio full", "torchaudio", _step("torchaudio", 1.0))]
    if config.full:
        result.append(Case("train", "masked LD f=0.50", "masked", _step("masked", 0.5)))
    return result + [
        Case("train", "dynenc full", "dynenc", _step("dynenc", 1.0)),
        Case("train", "dynenc LD f=0.50", "dynenc", _step("dynenc", 0.5)),
        Case("train", "dynenc LD f=0.50 checkpointed", "dynenc", _step("dynenc", 0.5, checkpoint_layers=True)),
    ]


def ratios(config: BenchConfig) -> List[Ratio]:
    ld, full = "train/dynenc LD f=0.50", "train/dynenc full"
    masked = [Ratio("train", "masked LD f=0.50 step / torchaudio full step", "train/masked LD f=0.50",
                    "train/torchaudio full")] if config.full else []
    return [
        Ratio("train", "dynenc LD f=0.50 step / dynenc full step", ld, full, target=0.55),
        Ratio("train", "dynenc LD f=0.50 saved activations / full", ld, full, target=0.60, metric="saved",
              note="bytes autograd saves for backward (distinct storages, parameters excluded)"),
        Ratio("train", "dynenc full step / torchaudio full step", full, "train/torchaudio full"),
        *masked,
        Ratio("train", "dynenc LD f=0.50 checkpointed step / not checkpointed", f"{ld} checkpointed", ld,
              note="activation checkpointing recomputes each executed layer's forward in the backward"),
        Ratio("train", "dynenc LD f=0.50 checkpointed saved activations / not checkpointed", f"{ld} checkpointed", ld,
              target=0.30, metric="saved", note="only each executed layer's input and the packing remain"),
    ]


FIGURE = Figure("train", cases, ratios)
