"""One inference interface for every method: a :class:`Budget` in, outputs and an
executed-work report out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..asr import CTCModel
from ..model import ExecutedWork
from .blank_skip import BlankSkipPolicy
from .early_exit import EarlyExitPolicy
from .layer_drop import fixed_layers_mask
from .selector import threshold_mask, topk_mask

METHODS = ("full", "layer_drop", "selector", "early_exit", "blank_skip")


@dataclass
class Budget:
    """What an inference may spend.

    Attributes:
        method: one of ``full``, ``layer_drop``, ``selector``, ``early_exit``, ``blank_skip``.
        layers: layer_drop: run n layers (``strategy``: every_other/first/random);
            selector: top-k layers per sample.
        selector_threshold: selector: run the layers with sigmoid(logit) > threshold instead of top-k.
        exit_threshold / criterion / fixed_exit: early_exit (``max_prob`` or ``entropy``).
        blank_threshold / spike_window: blank_skip (tau, w).
    """

    method: str = "full"
    layers: Optional[int] = None
    strategy: str = "every_other"
    selector_threshold: Optional[float] = None
    exit_threshold: Optional[float] = None
    criterion: str = "max_prob"
    fixed_exit: Optional[int] = None
    blank_threshold: Optional[float] = None
    spike_window: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"budget method must be one of {METHODS}, got {self.method!r}")
        needs = {"layer_drop": ("layers",), "blank_skip": ("blank_threshold",)}
        for name in needs.get(self.method, ()):
            if getattr(self, name) is None:
                raise ValueError(f"a {self.method} budget needs {name}")
        if self.method == "selector" and (self.layers is None) == (self.selector_threshold is None):
            raise ValueError("a selector budget needs exactly one of layers and selector_threshold")
        if self.method == "early_exit" and (self.exit_threshold is None) == (self.fixed_exit is None):
            raise ValueError("an early_exit budget needs exactly one of exit_threshold and fixed_exit")


@dataclass
class InferenceResult:
    """``log_probs [B, T', V]``, ``lengths [B]``, the executed-work report, the exit layer
    per sample (``[B]``, early exit) and the frames that skipped the upper layers
    (bool ``[B, T']``, blank skip)."""

    log_probs: Tensor
    lengths: Tensor
    report: ExecutedWork
    exit_layer: Optional[Tensor] = None
    skipped_frames: Optional[Tensor] = None


@torch.no_grad()
def infer(model: CTCModel, features: Tensor, lengths: Tensor, budget: Budget) -> InferenceResult:
    """Run ``model`` on ``features [B, T, F]`` within ``budget``."""
    x, x_lengths = model.embed(features, lengths)
    batch_size, num_layers = x.shape[0], model.config.num_layers
    method = budget.method
    if method == "full":
        log_probs, _, out = model.encode(x, x_lengths)
        return InferenceResult(log_probs, x_lengths, out.report)
    if method == "layer_drop":
        mask = fixed_layers_mask(num_layers, budget.layers, batch_size, budget.strategy, x.device)
        log_probs, _, out = model.encode(x, x_lengths, layer_mask=mask)
        return InferenceResult(log_probs, x_lengths, out.report)
    if method == "selector":
        if model.selector is None:
            raise ValueError("a selector budget needs a model trained with a layer selector")
        logits = model.selector(x, x_lengths)
        mask = (topk_mask(logits, budget.layers) if budget.layers is not None
                else threshold_mask(logits, budget.selector_threshold))
        log_probs, _, out = model.encode(x, x_lengths, layer_mask=mask)
        return InferenceResult(log_probs, x_lengths, out.report)
    if method == "early_exit":
        policy = EarlyExitPolicy(model, budget.exit_threshold, budget.criterion, budget.fixed_exit)
        everything = torch.ones(batch_size, num_layers, dtype=torch.bool, device=x.device)
        log_probs, _, out = model.encode(x, x_lengths, layer_mask=everything, policy=policy)
        if policy.exit_layer is None:  # no exit before the last layer
            return InferenceResult(log_probs, x_lengths, out.report, torch.full_like(x_lengths, num_layers))
        exited = out.packed.unpack(policy.log_probs)
        exit_layer = out.packed.to_sample_order(policy.exit_layer)
        early = (exit_layer < num_layers)[:, None, None]
        return InferenceResult(torch.where(early, exited, log_probs), x_lengths, out.report, exit_layer)
    if model.blank_head is None:
        raise ValueError("a blank_skip budget needs a model trained with an intermediate blank head")
    policy = BlankSkipPolicy(model.blank_head, model.config.blank_skip_layer, budget.blank_threshold,
                             budget.spike_window)
    log_probs, _, out = model.encode(x, x_lengths, policy=policy)
    skipped = out.packed.unpack(policy.skipped.unsqueeze(1).to(x.dtype)).squeeze(2) > 0.5
    # *choice*: frames judged blank emit blank in the final posteriors.
    blank = F.one_hot(torch.zeros_like(x_lengths), log_probs.shape[-1]).to(log_probs.dtype).log()[:, None, :]
    return InferenceResult(torch.where(skipped.unsqueeze(-1), blank, log_probs), x_lengths, out.report,
                           skipped_frames=skipped)
