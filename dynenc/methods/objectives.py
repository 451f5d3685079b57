"""Training objectives of the methods: each maps ``(model, batch)`` to ``(loss, logs)``.

A batch is ``(features [B, T, F], lengths [B], targets [sum U], target_lengths [B])``.
Every objective is a policy on the one encoder forward (masks, gates, hidden states); none
has a layer loop of its own.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..asr import CTCModel, ctc_loss, distillation_kl, masked_mean
from .layer_drop import RandomLayerDrop
from .selector import budget_regulariser, straight_through_topk

Batch = Tuple[Tensor, Tensor, Tensor, Tensor]
Logs = Dict[str, float]


class StaticCTC:
    """Full-depth CTC training (the static baseline / teacher)."""

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        log_probs, out_lengths, _ = model(features, lengths)
        loss = ctc_loss(log_probs, out_lengths, targets, target_lengths)
        return loss, {"ctc": loss.item()}


class LayerDropCTC:
    """CTC with random layer dropping (per-sample Bernoulli keep masks, torch RNG)."""

    def __init__(self, num_layers: int, drop_prob: Union[float, Tensor] = 0.5, per_sample: bool = True) -> None:
        self.dropper = RandomLayerDrop(num_layers, drop_prob, per_sample)

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        mask = self.dropper.sample(features.shape[0], features.device)
        log_probs, out_lengths, _ = model(features, lengths, layer_mask=mask)
        loss = ctc_loss(log_probs, out_lengths, targets, target_lengths)
        return loss, {"ctc": loss.item(), "kept": mask.float().mean().item()}


class DLDObjective:
    """Distillation-based layer dropping (arXiv 2601.16117).

    ``loss = CTC(student) + weight * T^2 * KL(teacher || student)`` over valid frames
    (+ ``hidden_weight`` * mean squared distance of the hidden states at every layer).
    The student runs with per-sample Bernoulli(``drop_prob``) gates. The teacher is a frozen
    full-depth model of the same front-end shape, or ``"self"`` (*choice*): the student's
    own full-depth pass without gradient.
    """

    def __init__(self, teacher: Union[CTCModel, str] = "self", weight: float = 1.0, temperature: float = 1.0,
                 drop_prob: float = 0.5, hidden_weight: float = 0.0) -> None:
        if isinstance(teacher, str) and teacher != "self":
            raise ValueError(f"teacher must be a CTCModel or 'self', got {teacher!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = teacher
        if not isinstance(teacher, str):
            teacher.eval().requires_grad_(False)
        self.weight, self.temperature, self.hidden_weight = weight, temperature, hidden_weight
        self.drop_prob = drop_prob

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        keep_hidden = self.hidden_weight > 0
        x, x_lengths = model.embed(features, lengths)
        with torch.no_grad():
            if self.teacher == "self":
                teacher_lp, _, teacher_out = model.encode(x, x_lengths, return_hidden=keep_hidden)
            else:
                teacher_lp, _, teacher_out = self.teacher(features, lengths, return_hidden=keep_hidden)
        mask = RandomLayerDrop(model.config.num_layers, self.drop_prob).sample(features.shape[0], features.device)
        student_lp, _, student_out = model.encode(x, x_lengths, layer_mask=mask, return_hidden=keep_hidden)
        ctc = ctc_loss(student_lp, x_lengths, targets, target_lengths)
        kd = distillation_kl(teacher_lp, student_lp, x_lengths, self.temperature)
        loss = ctc + self.weight * kd
        logs = {"ctc": ctc.item(), "kd": kd.item()}
        if keep_hidden:
            align = torch.stack([F.mse_loss(s, t) for s, t in zip(student_out.hidden, teacher_out.hidden)]).mean()
            loss = loss + self.hidden_weight * align
            logs["align"] = align.item()
        return loss, logs


class SelectorObjective:
    """Input-conditioned layer selection (arXiv 2507.07954), training (*choice*): a budget k
    drawn per batch from ``[min_layers, L]``; Gumbel top-k with straight-through gates so
    the hard mask runs ragged while gradients reach the selector; plus a budget regulariser."""

    def __init__(self, min_layers: int = 1, regulariser_weight: float = 0.01, temperature: float = 1.0) -> None:
        self.min_layers = min_layers
        self.regulariser_weight = regulariser_weight
        self.temperature = temperature

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        if model.selector is None:
            raise ValueError("SelectorObjective needs a model built with selector_hidden > 0")
        features, lengths, targets, target_lengths = batch
        k = int(torch.randint(self.min_layers, model.config.num_layers + 1, ()))  # torch RNG: resumable
        x, x_lengths = model.embed(features, lengths)
        logits = model.selector(x, x_lengths)
        mask, gates = straight_through_topk(logits, k, self.temperature)
        log_probs, _, _ = model.encode(x, x_lengths, layer_mask=mask, gates=gates)
        ctc = ctc_loss(log_probs, x_lengths, targets, target_lengths)
        reg = budget_regulariser(logits, k)
        return ctc + self.regulariser_weight * reg, {"ctc": ctc.item(), "budget_reg": reg.item(), "k": float(k)}


class EarlyExitObjective:
    """Early exits (arXiv 2309.09546): weighted sum of the CTC losses of every exit head
    (full-depth forward, hidden states read at each exit layer)."""

    def __init__(self, weights: Optional[Dict[int, float]] = None) -> None:
        self.weights = weights or {}

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        x, x_lengths = model.embed(features, lengths)
        out = model.encoder(x, x_lengths, return_hidden=True)
        exits = sorted(set(model.config.exit_layers) | {model.config.num_layers})
        loss, logs = 0.0, {}
        for layer in exits:
            hidden = out.packed.unpack(out.hidden[layer - 1])
            log_probs = F.log_softmax(model.exit_head(layer)(hidden), dim=-1)
            exit_loss = ctc_loss(log_probs, x_lengths, targets, target_lengths)
            loss = loss + self.weights.get(layer, 1.0) * exit_loss
            logs[f"ctc{layer}"] = exit_loss.item()
        return loss, logs


class BlankSkipObjective:
    """CTC-blank frame skipping (arXiv 2401.02046): CTC at the final head and at the
    intermediate head of layer K, plus KD from the final posteriors to the intermediate head."""

    def __init__(self, intermediate_weight: float = 0.5, kd_weight: float = 0.5, temperature: float = 1.0) -> None:
        self.intermediate_weight, self.kd_weight, self.temperature = intermediate_weight, kd_weight, temperature

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        if model.blank_head is None:
            raise ValueError("BlankSkipObjective needs a model built with blank_skip_layer > 0")
        features, lengths, targets, target_lengths = batch
        x, x_lengths = model.embed(features, lengths)
        out = model.encoder(x, x_lengths, return_hidden=True)
        final_lp = F.log_softmax(model.ctc_head(out.output), dim=-1)
        inter_lp = model.blank_head(out.packed.unpack(out.hidden[model.config.blank_skip_layer - 1]))
        final = ctc_loss(final_lp, x_lengths, targets, target_lengths)
        inter = ctc_loss(inter_lp, x_lengths, targets, target_lengths)
        kd = distillation_kl(final_lp, inter_lp, x_lengths, self.temperature)
        loss = final + self.intermediate_weight * inter + self.kd_weight * kd
        blank_rate = masked_mean(inter_lp[..., 0].exp(), x_lengths)
        return loss, {"ctc": final.item(), "ctc_inter": inter.item(), "kd": kd.item(), "p_blank": blank_rate.item()}
