"""DLD, distillation-based layer dropping (arXiv 2601.16117): layer dropping trained with a
KL term towards a full-depth teacher; inference as layer dropping."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..asr import CTCModel, ctc_loss, distillation_kl, load_checkpoint
from . import layer_drop
from .base import Batch, Logs, Method, ObjectiveSettings, frozen


class DLDObjective:
    """``loss = CTC(student) + weight * T^2 * KL(teacher || student)`` over valid frames
    (+ ``hidden_weight`` * mean squared distance of the hidden states at every layer).

    The student runs with Bernoulli(``drop_prob``) gates (default 0.5: the paper's), drawn
    per ``gating`` as in :class:`~dynenc.methods.layer_drop.RandomLayerDrop` (default
    ``"per_sample"``: our choice; the authors' LD code draws ``"per_batch"``). The teacher is
    a full-depth model of the same front-end shape, or ``"self"`` (*choice*): the student's
    own full-depth pass. Either teacher runs in eval mode without grad and leaves the
    teacher's state as it found it (training flags, BatchNorm statistics), so with nothing
    dropped and no dropout or BatchNorm batch statistics in the student the KL term is 0.
    """

    def __init__(
        self,
        teacher: Union[CTCModel, str] = "self",
        *,
        weight: float = 1.0,
        temperature: float = 1.0,
        drop_prob: float = 0.5,
        hidden_weight: float = 0.0,
        gating: str = "per_sample",
    ) -> None:
        if isinstance(teacher, str) and teacher != "self":
            raise ValueError(f"teacher must be a CTCModel or 'self', got {teacher!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        layer_drop.check_gating("DLDObjective.gating", gating)
        self.teacher = teacher
        self.weight, self.temperature, self.hidden_weight = weight, temperature, hidden_weight
        self.drop_prob, self.gating = drop_prob, gating

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        features, lengths, targets, target_lengths = batch
        keep_hidden = self.hidden_weight > 0
        # The front-end has no dropout or BatchNorm, so its output is the same in eval mode:
        # the self-teacher reuses it (detached) instead of running it a second time.
        x, x_lengths = model.embed(features, lengths)
        if isinstance(self.teacher, CTCModel):
            with frozen(self.teacher):
                teacher_lp, _, teacher_out = self.teacher(features, lengths, return_hidden=keep_hidden)
        else:  # "self"
            with frozen(model):
                teacher_lp, _, teacher_out = model.encode(x.detach(), x_lengths, return_hidden=keep_hidden)
        mask = layer_drop.RandomLayerDrop(model.config.num_layers, self.drop_prob, self.gating).sample(
            features.shape[0], features.device
        )
        student_lp, student_lengths, student_out = model.encode(
            x, x_lengths, layer_mask=mask, return_hidden=keep_hidden
        )
        ctc = ctc_loss(student_lp, student_lengths, targets, target_lengths)
        kd = distillation_kl(teacher_lp, student_lp, student_lengths, self.temperature)
        loss = ctc + self.weight * kd
        logs = {"ctc": ctc.item(), "kd": kd.item()}
        if keep_hidden:
            pairs = zip(student_out.hidden or [], teacher_out.hidden or [])  # both kept: keep_hidden
            align = torch.stack([F.mse_loss(s, t) for s, t in pairs]).mean()
            loss = loss + self.hidden_weight * align
            logs["align"] = align.item()
        return loss, logs


def objective(settings: ObjectiveSettings, model: CTCModel) -> DLDObjective:
    """Teacher: ``settings.teacher`` is ``"self"`` or the path of a static model's checkpoint."""
    teacher = (
        "self"
        if settings.teacher == "self"
        else load_checkpoint(Path(settings.teacher))[0].to(next(model.parameters()).device)
    )
    return DLDObjective(
        teacher,
        weight=settings.kd_weight,
        temperature=settings.temperature,
        drop_prob=settings.drop_prob,
        hidden_weight=settings.hidden_weight,
        gating=settings.gating,
    )


METHOD = Method(
    name="dld",
    summary="layer dropping + distillation from a full-depth teacher",
    budget_type=layer_drop.LayerDropBudget,
    run=layer_drop.run,
    objective=objective,
    budgets=layer_drop.budgets,
    chooses_layers=True,
)
