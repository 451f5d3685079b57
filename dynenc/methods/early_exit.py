"""Early exits (arXiv 2309.09546): CTC heads after some layers; at inference a sample leaves
the batch at the first exit whose confidence passes a threshold (or at a fixed exit)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..asr import CTCModel
from ..asr.config import ModelConfig
from ..routing import Schedule, VarlenBatch
from ..validation import check_int, check_real
from .base import (
    Batch,
    Budget,
    Decisions,
    InferenceResult,
    Logs,
    Method,
    ObjectiveSettings,
    exit_ctc_losses,
    require_one_of,
)

CRITERIA = ("nbest_posterior", "entropy", "max_prob")


def frame_confidence(log_probs: Tensor, criterion: str) -> Tensor:
    """Per-frame confidence ``[*]`` of posteriors ``[*, V]`` whose mean over an utterance's
    frames is its confidence: ``max_prob`` the max posterior (in (0, 1]; ours), ``entropy``
    the negative entropy divided by V, ``sum_v p log p / V`` (<= 0; mean over frames gives the
    authors' ``sum_t sum_v p log p / (T V)``)."""
    if criterion == "max_prob":
        return log_probs.max(-1).values.exp()
    if criterion == "entropy":
        return (log_probs.exp() * log_probs).sum(-1) / log_probs.shape[-1]
    raise ValueError(f"criterion must be max_prob or entropy for a per-frame confidence, got {criterion!r}")


@functools.lru_cache(maxsize=8)
def _nbest_decoder(vocab_size: int, nbest: int):
    """torchaudio's lexicon-free CTC beam search returning ``nbest`` hypotheses (beam = nbest).
    Unit names are placeholders: only the hypotheses' scores are read."""
    from torchaudio.models.decoder import ctc_decoder

    tokens = ["<blank>"] + [f"u{i}" for i in range(1, vocab_size)]
    return ctc_decoder(
        lexicon=None, tokens=tokens, lm=None, nbest=nbest, beam_size=nbest, blank_token="<blank>", sil_token="<blank>"
    )


def nbest_posterior(log_probs: Tensor, lengths: Tensor, nbest: int) -> Tensor:
    """The seed-003 authors' confidence: beam search gives the ``nbest`` best hypotheses with
    scores ``s_i``; the 1-best's posterior among them is ``softmax(s)_0``.

    Args:
        log_probs: ``[B, T, V]`` CTC log-posteriors (blank = 0).
        lengths: int ``[B]`` valid frames.
    Returns:
        float ``[B]`` in (0, 1] (1 when a single hypothesis survives; 0 for an empty utterance).
    """
    emissions = log_probs.detach().float().cpu().contiguous()
    hypotheses = _nbest_decoder(log_probs.shape[-1], nbest)(emissions, lengths.to(torch.int32).cpu())
    posterior = [
        torch.softmax(torch.tensor([h.score for h in hyps], dtype=torch.float64), 0)[0].item() if hyps else 0.0
        for hyps in hypotheses
    ]
    return torch.tensor(posterior, dtype=log_probs.dtype, device=log_probs.device)


@dataclass(frozen=True)
class EarlyExitBudget(Budget):
    """Exactly one of: ``threshold`` (a sample exits at the first exit whose confidence under
    ``criterion`` reaches it) or ``fixed_exit`` (every sample exits at that depth: after that many layers).

    Criteria (per utterance): ``"nbest_posterior"`` (default; the seed-003 authors'): the
    1-best's posterior among the ``nbest`` beam-search hypotheses, threshold in [0, 1] (their
    code uses N in the hundreds; each exit point then runs a CPU beam search per running
    utterance); ``"entropy"`` (the authors'): ``sum_t sum_v p log p / (T V)``, threshold <= 0;
    ``"max_prob"`` (ours): the mean frame max-posterior, threshold in [0, 1], computed on the
    device with no beam search.
    """

    threshold: Optional[float] = None
    criterion: str = "nbest_posterior"
    fixed_exit: Optional[int] = None
    nbest: int = 16

    def __post_init__(self) -> None:
        require_one_of("EarlyExitBudget", threshold=self.threshold, fixed_exit=self.fixed_exit)
        if self.criterion not in CRITERIA:
            raise ValueError(f"EarlyExitBudget.criterion must be one of {CRITERIA}, got {self.criterion!r}")
        check_int("EarlyExitBudget.nbest", self.nbest, low=1)
        if self.fixed_exit is not None:
            check_int("EarlyExitBudget.fixed_exit", self.fixed_exit, low=1)
            # criterion and nbest configure threshold exits: given beside a fixed exit they would
            # be silently ignored.
            for name, default in (("criterion", "nbest_posterior"), ("nbest", 16)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"EarlyExitBudget.{name}={getattr(self, name)!r} configures threshold exits; with "
                        f"fixed_exit={self.fixed_exit} every sample exits there and no {name} is read"
                    )
            return
        threshold = check_real("EarlyExitBudget.threshold", self.threshold)
        in_range = threshold <= 0 if self.criterion == "entropy" else 0 <= threshold <= 1
        if not in_range:
            expected = "(-inf, 0] (a negative entropy)" if self.criterion == "entropy" else "[0, 1]"
            raise ValueError(
                f"EarlyExitBudget.threshold must lie in {expected} for criterion {self.criterion!r}, "
                f"got {self.threshold}"
            )

    def check(self, model: CTCModel) -> None:
        exits = model.config.head_depths
        if self.fixed_exit is not None and self.fixed_exit not in exits:
            raise ValueError(
                f"EarlyExitBudget.fixed_exit must be one of the model's exit depths {list(exits)}, "
                f"got {self.fixed_exit}"
            )
        if self.threshold is not None and len(exits) == 1:
            raise ValueError(
                "an EarlyExitBudget with a threshold needs a model with early-exit heads (ModelConfig.exit_depths)"
            )


@dataclass(frozen=True)
class ExitDecision:
    """At one exit depth: ``exits`` bool ``[B]`` (packed order) the samples that stop
    there, and ``log_probs [N, V]`` that exit head's posteriors (rows of samples that were no
    longer running are zero: the head runs only on rows still running)."""

    exits: Tensor
    log_probs: Tensor


@dataclass(frozen=True, eq=False)
class EarlyExitPolicy:
    """Routing policy: at each exit depth, the samples still running whose confidence
    reaches the threshold (or every sample, at a fixed exit) stop; their rows leave the batch.

    No overhead while nobody exits: the schedule stays the full prefix (no gather/scatter)
    until a first sample exits; the exit head runs only on the rows still running."""

    model: CTCModel
    budget: EarlyExitBudget

    def __post_init__(self) -> None:
        # Refused here, where the policy is made, not only in methods.infer: a fixed exit the
        # model has no head for would give the encoder no decision point, i.e. full depth.
        self.budget.check(self.model)

    @property
    def decision_layers(self) -> Tuple[int, ...]:
        num_layers, fixed = self.model.config.num_layers, self.budget.fixed_exit
        return tuple(e - 1 for e in self.model.config.head_depths if e < num_layers and fixed in (None, e))

    def decide(self, layer: int, x: Tensor, schedule: Schedule) -> Tuple[Schedule, ExitDecision]:
        with torch.profiler.record_function("dynenc.early_exit"):
            batch, head = schedule.batch, self.model.exit_head(layer + 1)
            x = self.model.encoder.finish_rows(x, batch)  # what the head reads (a pre-LN final norm)
            if schedule.sample_mask is None:  # everyone still runs
                running = torch.ones(batch.num_seqs, dtype=torch.bool, device=x.device)
                log_probs = F.log_softmax(head(x), dim=-1)
            else:
                running = schedule.sample_mask[:, layer + 1 :].any(1)
                rows = running.index_select(0, batch.seq_ids).nonzero().squeeze(1)
                log_probs = ops.scatter_rows(
                    F.log_softmax(head(ops.gather_rows(x, rows)), dim=-1), rows, batch.num_rows
                )
            exits = running & self._confident(log_probs, batch) if self.budget.fixed_exit is None else running
            if schedule.sample_mask is None and not bool(exits.any()):  # one host sync per exit point
                return schedule, ExitDecision(exits, log_probs)
            mask = (
                torch.ones(batch.num_seqs, self.model.config.num_layers, dtype=torch.bool, device=x.device)
                if schedule.sample_mask is None
                else schedule.sample_mask.clone()
            )
            mask[:, layer + 1 :] &= ~exits.unsqueeze(1)
        return schedule.replace(sample_mask=mask), ExitDecision(exits, log_probs)

    def _confident(self, log_probs: Tensor, batch: VarlenBatch) -> Tensor:
        """bool ``[B]``: the utterances whose confidence reaches the threshold."""
        budget = self.budget
        if budget.criterion == "nbest_posterior":
            padded = ops.scatter_rows(log_probs, batch.padded_positions(), batch.num_seqs * batch.max_seqlen)
            confidence = nbest_posterior(padded.view(batch.num_seqs, batch.max_seqlen, -1), batch.lengths, budget.nbest)
        else:
            total = log_probs.new_zeros(batch.num_seqs).index_add_(
                0, batch.seq_ids, frame_confidence(log_probs, budget.criterion)
            )
            confidence = total / batch.lengths.clamp_min(1)
        return confidence >= cast(float, budget.threshold)  # a policy runs a threshold budget only


def run(model: CTCModel, x: Tensor, lengths: Tensor, budget: EarlyExitBudget) -> InferenceResult:
    """Each sample's posteriors come from the head it exited at."""
    batch_size, num_layers = x.shape[0], model.config.num_layers
    log_probs, _, out = model.encode(x, lengths, policy=EarlyExitPolicy(model, budget))
    exit_depth = torch.full((batch_size,), num_layers, dtype=torch.int64, device=x.device)  # packed order
    exit_rows = x.new_zeros(out.packed.batch.num_rows, model.config.vocab_size)
    for layer, decision in sorted(out.decisions.items()):
        exit_rows = torch.where(
            decision.exits.index_select(0, out.packed.batch.seq_ids).unsqueeze(1), decision.log_probs, exit_rows
        )
        exit_depth = torch.where(decision.exits, layer + 1, exit_depth)
    exit_depth = out.packed.to_sample_order(exit_depth)
    early = (exit_depth < num_layers)[:, None, None]
    log_probs = torch.where(early, out.packed.unpack(exit_rows), log_probs)
    return InferenceResult(log_probs, lengths, out.report, Decisions(exit_depth=exit_depth))


class EarlyExitObjective:
    """Weighted sum of the CTC losses of every exit head (weight 1 unless ``weights`` says
    otherwise; full-depth forward, hidden states read at each exit depth)."""

    def __init__(self, weights: Optional[Dict[int, float]] = None) -> None:
        self.weights = weights or {}

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        losses = exit_ctc_losses(model, batch)
        loss = cast(Tensor, sum(self.weights.get(layer, 1.0) * exit_loss for layer, exit_loss in losses.items()))
        return loss, {f"ctc{layer}": exit_loss.item() for layer, exit_loss in losses.items()}


def budgets(model: CTCModel) -> List[Tuple[str, Budget]]:
    """Every fixed exit, then (with exits before the last layer) confidence thresholds of every criterion."""
    fixed: List[Tuple[str, Budget]] = [(f"exit={e}", EarlyExitBudget(fixed_exit=e)) for e in model.config.head_depths]
    if len(model.config.head_depths) == 1:
        return fixed
    return fixed + [
        (f"{criterion} thr={t}", EarlyExitBudget(threshold=t, criterion=criterion))
        for criterion, values in (
            ("nbest_posterior", (0.9, 0.7, 0.5, 0.3)),
            ("max_prob", (0.99, 0.97, 0.95, 0.9, 0.8)),
            ("entropy", (-0.002, -0.004, -0.008, -0.016)),
        )
        for t in values
    ]


def objective(settings: ObjectiveSettings, model: CTCModel) -> EarlyExitObjective:
    return EarlyExitObjective()


def model_fields(config: ModelConfig) -> Dict[str, Any]:
    """Exit heads after every second layer unless the config names its exits."""
    return {} if config.exit_depths else {"exit_depths": tuple(range(2, config.num_layers + 1, 2))}


METHOD = Method(
    name="early_exit",
    summary="early exits: CTC heads after every second layer",
    budget_type=EarlyExitBudget,
    run=run,
    objective=objective,
    budgets=budgets,
    model_fields=model_fields,
)
