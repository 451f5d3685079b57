"""CTC-blank frame skipping (arXiv 2401.02046): the model's intermediate
:class:`~dynenc.asr.heads.CTCHead` at layer K scores p(blank) per frame; frames with
p(blank) > tau leave the sequence for layers K+1..L unless they lie within w frames of a
non-blank frame (spike extension). Skipped frames emit blank (*choice*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..asr import CTCHead, CTCModel, ctc_loss, distillation_kl, masked_mean
from ..asr.config import ModelConfig
from ..model import EncoderOutput
from ..routing import Schedule, VarlenBatch
from ..validation import check_int, check_real
from .base import Batch, Budget, Decisions, InferenceResult, Logs, Method, ObjectiveSettings
from .static import FullBudget


def dilate_within_sequences(mask: Tensor, batch: VarlenBatch, window: int) -> Tensor:
    """bool ``[N]``: rows within ``window`` rows of a True row of the same sequence."""
    if window == 0:
        return mask
    weight = torch.ones(1, 2 * window + 1, dtype=torch.float32, device=mask.device)
    return ops.varlen_dwconv1d(mask.float().unsqueeze(1), batch.cu_seqlens, weight)[:, 0] > 0.5


def blank_head(model: CTCModel, what: str) -> CTCHead:
    """``model``'s intermediate blank head; ``ValueError`` naming ``what`` when it has none."""
    if model.blank_head is None:
        raise ValueError(f"{what} needs a model with an intermediate blank head (ModelConfig.blank_skip_depth > 0)")
    return model.blank_head


@dataclass(frozen=True)
class BlankSkipBudget(Budget):
    """Frames with p(blank) > ``threshold`` (tau in (0, 1]) at layer K skip the upper layers,
    except those within ``spike_window`` (w >= 0) frames of a non-blank frame."""

    threshold: float
    spike_window: int = 1

    def __post_init__(self) -> None:
        check_real("BlankSkipBudget.threshold", self.threshold)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"BlankSkipBudget.threshold must lie in (0, 1], got {self.threshold}")
        check_int("BlankSkipBudget.spike_window", self.spike_window, low=0)

    def check(self, model: CTCModel) -> None:
        blank_head(model, "a BlankSkipBudget")


@dataclass(frozen=True, eq=False)
class BlankSkipPolicy:
    """Routing policy: at depth ``layer`` (K: after the first K layers), keep only the non-blank frames
    (+ spike extension). Its decision is the bool ``[N]`` packed-row mask of skipped frames."""

    head: CTCHead
    layer: int
    budget: BlankSkipBudget
    #: What the head reads of the rows (the encoder's finish_rows, e.g. a pre-LN final norm).
    finish: Callable[[Tensor, VarlenBatch], Tensor] = lambda x, batch: x

    @property
    def decision_layers(self) -> Tuple[int, ...]:
        return (self.layer - 1,)

    def decide(self, layer: int, x: Tensor, schedule: Schedule) -> Tuple[Schedule, Tensor]:
        with torch.profiler.record_function("dynenc.blank_skip"):
            nonblank = self.head.blank_log_prob(self.finish(x, schedule.batch)).exp() <= self.budget.threshold
            keep = dilate_within_sequences(nonblank, schedule.batch, self.budget.spike_window)
            if schedule.row_alive is not None:
                keep = keep & schedule.row_alive
        return schedule.replace(row_alive=keep), ~keep


def skipping_forward(
    model: CTCModel, x: Tensor, lengths: Tensor, budget: BlankSkipBudget, return_hidden: bool = False
) -> Tuple[Tensor, Tensor, EncoderOutput]:
    """The encoder with frames skipped after layer K, then the final head on the frames that
    ran every layer only (skipped frames emit blank, *choice*, and cost nothing there).

    Used at inference and, with ``skip_threshold`` set, in training, so the upper layers see
    the same compacted sequences in both. Returns ``(log_probs [B, T', V], skipped bool
    [B, T'], EncoderOutput)``.
    """
    policy = BlankSkipPolicy(
        blank_head(model, "blank skipping"), model.config.blank_skip_depth, budget, model.encoder.finish_rows
    )
    out = model.encoder(x, lengths, policy=policy, return_report=True, return_hidden=return_hidden)
    packed = out.packed
    skipped_rows = out.decisions[policy.layer - 1]
    kept = (~skipped_rows).nonzero().squeeze(1)
    flat_positions = kept if packed.positions is None else packed.positions.index_select(0, kept)
    rows = ops.gather_rows(out.output.reshape(-1, out.output.shape[-1]), flat_positions)
    log_probs_kept = F.log_softmax(model.ctc_head(rows), dim=-1)
    blank_row = torch.full((model.config.vocab_size,), float("-inf"), dtype=log_probs_kept.dtype, device=x.device)
    blank_row[0] = 0.0
    packed_log_probs = blank_row.expand(packed.batch.num_rows, -1).index_copy(0, kept, log_probs_kept)
    skipped = packed.unpack(skipped_rows.unsqueeze(1).to(x.dtype)).squeeze(2) > 0.5
    return packed.unpack(packed_log_probs), skipped, out


def run(model: CTCModel, x: Tensor, lengths: Tensor, budget: BlankSkipBudget) -> InferenceResult:
    log_probs, skipped, out = skipping_forward(model, x, lengths, budget)
    return InferenceResult(log_probs, lengths, out.report, Decisions(skipped_frames=skipped))


class BlankSkipObjective:
    """CTC at the final head and at the intermediate head of layer K, plus KD from the final
    posteriors to the intermediate head (the paper's).

    ``skip_threshold`` (*choice*, off by default): train with skipping active — frames with
    p(blank) > tau at layer K leave the sequence for the upper layers exactly as at
    inference (:func:`skipping_forward`; skipped frames emit blank in the final posteriors),
    so the upper layers learn on the compacted sequences they will see.
    """

    def __init__(
        self,
        intermediate_weight: float = 0.5,
        kd_weight: float = 0.5,
        temperature: float = 1.0,
        skip_threshold: Optional[float] = None,
        spike_window: int = 1,
    ) -> None:
        self.intermediate_weight, self.kd_weight, self.temperature = intermediate_weight, kd_weight, temperature
        self.skipping = None if skip_threshold is None else BlankSkipBudget(skip_threshold, spike_window)

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        head = blank_head(model, "BlankSkipObjective")
        features, lengths, targets, target_lengths = batch
        x, x_lengths = model.embed(features, lengths)
        logs = {}
        if self.skipping is None:
            out = model.encoder(x, x_lengths, return_hidden=True)
            final_lp = F.log_softmax(model.ctc_head(out.output), dim=-1)
        else:
            final_lp, skipped, out = skipping_forward(model, x, x_lengths, self.skipping, return_hidden=True)
            logs["skipped"] = masked_mean(skipped.to(x.dtype), x_lengths).item()
        inter_lp = head(model.rows_at_depth(out, model.config.blank_skip_depth))
        final = ctc_loss(final_lp, x_lengths, targets, target_lengths)
        inter = ctc_loss(inter_lp, x_lengths, targets, target_lengths)
        kd = distillation_kl(final_lp, inter_lp, x_lengths, self.temperature)
        loss = final + self.intermediate_weight * inter + self.kd_weight * kd
        blank_rate = masked_mean(inter_lp[..., 0].exp(), x_lengths)
        logs.update(ctc=final.item(), ctc_inter=inter.item(), kd=kd.item(), p_blank=blank_rate.item())
        return loss, logs


def budgets(model: CTCModel) -> List[Tuple[str, Budget]]:
    return [("full", FullBudget())] + [
        (f"tau={t}", BlankSkipBudget(t, spike_window=1)) for t in (0.999, 0.99, 0.95, 0.9, 0.8, 0.6)
    ]


def objective(settings: ObjectiveSettings, model: CTCModel) -> BlankSkipObjective:
    return BlankSkipObjective(
        kd_weight=settings.kd_weight, temperature=settings.temperature, skip_threshold=settings.skip_threshold or None
    )


def model_fields(config: ModelConfig) -> Dict[str, Any]:
    """The blank head at layer L/2, factorized, unless the config places it."""
    return {} if config.blank_skip_depth else {"blank_skip_depth": config.num_layers // 2, "factorized_ctc": True}


METHOD = Method(
    name="blank_skip",
    summary="CTC-blank frame skipping after an intermediate blank head",
    budget_type=BlankSkipBudget,
    run=run,
    objective=objective,
    budgets=budgets,
    model_fields=model_fields,
)
