"""Losses shared by the training objectives (and the benchmark's training steps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..routing import valid_frames


def ctc_loss(log_probs: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
    """Mean-over-batch CTC loss of ``log_probs [B, T', V]`` (blank = 0; per-utterance sum
    over frames divided by the target length)."""
    return F.ctc_loss(
        log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=0, reduction="mean", zero_infinity=True
    )


def masked_mean(values: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``values [B, T]`` over valid frames."""
    valid = valid_frames(lengths, values.shape[1])
    return (values * valid).sum() / valid.sum().clamp_min(1)


def distillation_kl(
    teacher_log_probs: Tensor, student_log_probs: Tensor, lengths: Tensor, temperature: float = 1.0
) -> Tensor:
    """``T^2 * KL(teacher || student)`` of frame posteriors at temperature T, mean over valid frames.

    Both inputs are log-probabilities ``[B, T', V]``; softening at temperature T is
    ``log_softmax(log_p / T)`` (the same as softening the logits). The teacher is detached.
    """
    teacher = F.log_softmax(teacher_log_probs.detach() / temperature, dim=-1)
    student = F.log_softmax(student_log_probs / temperature, dim=-1)
    probs = teacher.exp()
    # 0 * log 0 = 0: a teacher that rules a unit out (log p = -inf) adds nothing, not NaN.
    kl = torch.where(probs > 0, probs * (teacher - student), 0.0).sum(-1)
    return masked_mean(kl, lengths) * temperature**2
