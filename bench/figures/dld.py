"""``dld``: the DLD training step of the CTC model (self-teacher full-depth forward +
student with per-sample Bernoulli(0.5) gates) against teacher forward + full-depth student
step."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from dynenc.asr import CTCModel, ctc_loss, distillation_kl
from dynenc.methods import DLDObjective

from ..harness import Prepared, TrainStep
from ..workload import BenchConfig, Workload
from .base import Builder, Case, Figure, Ratio


def _teacher_and_full_student_loss(model: CTCModel, batch) -> Tensor:
    """The DLD baseline: the same teacher forward and losses, full-depth student."""
    features, lengths, targets, target_lengths = batch
    x, x_lengths = model.embed(features, lengths)
    with torch.no_grad():
        teacher_log_probs, _, _ = model.encode(x, x_lengths)
    student_log_probs, _, _ = model.encode(x, x_lengths)
    return (ctc_loss(student_log_probs, x_lengths, targets, target_lengths)
            + distillation_kl(teacher_log_probs, student_log_probs, x_lengths))


def _step(dropping: bool) -> Builder:
    def build(w: Workload) -> Prepared:
        model, batch = w.ctc_model, w.speech_batch
        if dropping:
            objective = DLDObjective("self", drop_prob=0.5)

            def loss() -> Tensor:
                torch.manual_seed(w.config.seed)  # the same gates every round: a fixed workload
                return objective(model, batch)[0]
        else:
            def loss() -> Tensor:
                return _teacher_and_full_student_loss(model, batch)
        step = TrainStep(loss, [model], w.device)
        return Prepared(step, dict(saved_mb=step.saved_bytes() / 2**20))

    return build


def cases(config: BenchConfig) -> List[Case]:
    return [
        Case("dld", "teacher fwd + full student step", "dynenc", _step(False)),
        Case("dld", "DLD step (p=0.5)", "dynenc", _step(True)),
    ]


def ratios(config: BenchConfig) -> List[Ratio]:
    return [Ratio("dld", "DLD step / (teacher fwd + full student step)", "dld/DLD step (p=0.5)",
                  "dld/teacher fwd + full student step", target=0.67)]


FIGURE = Figure("dld", cases, ratios)
