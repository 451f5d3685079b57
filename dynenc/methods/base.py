"""What every method module provides (a :class:`Method` spec) and the pieces they share:
the budget base class and its field checks, the inference result, the objective protocol,
the frozen (eval-mode, no-grad) pass."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..asr import CTCModel, ctc_loss
from ..asr.config import ModelConfig
from ..model import ExecutedWork

Batch = Tuple[Tensor, Tensor, Tensor, Tensor]  # features [B, T, F], lengths [B], targets [sum U], target_lengths [B]
Logs = Dict[str, float]


class Objective(Protocol):
    """A training objective: ``(model, batch) -> (loss, logs)``."""

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]: ...


class ObjectiveSettings(Protocol):
    """The training hyper-parameters the methods' objective factories read
    (:class:`dynenc.asr.train.TrainConfig` has them)."""

    drop_prob: float
    kd_weight: float
    temperature: float
    hidden_weight: float
    teacher: str
    gating: str
    skip_threshold: float
    inter_ctc_weight: float


class Budget:
    """Base of the typed budgets. Each method's budget is a frozen dataclass that checks its
    own fields in ``__post_init__``; :meth:`check` checks it against a model."""

    def check(self, model: CTCModel) -> None:
        """Raise ``ValueError`` when ``model`` cannot run this budget (e.g. lacks a head)."""


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module`` in eval mode and without grad, then give every submodule
    its own training flag back (mixed modes included). An eval-mode pass leaves BatchNorm's
    running statistics untouched and draws no dropout masks."""
    training = [submodule for submodule in module.modules() if submodule.training]
    if not training:  # already in eval mode (a deployed model): nothing to switch or give back
        with torch.no_grad():
            yield
        return
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        # eval() cleared every flag: set back the ones that were on (nn.Module's __setattr__
        # costs microseconds a module, which a batch-1 call notices).
        for submodule in training:
            submodule.training = True


def exit_ctc_losses(model: CTCModel, batch: Batch) -> Dict[int, Tensor]:
    """CTC loss of every exit head (``model.config.head_depths``, the last layer's being the final
    head), all from one full-depth forward that keeps each layer's hidden states:
    ``{layer: loss}``."""
    features, lengths, targets, target_lengths = batch
    x, x_lengths = model.embed(features, lengths)
    out = model.encoder(x, x_lengths, return_hidden=True)
    losses = {}
    for layer in model.config.head_depths:
        log_probs = F.log_softmax(model.exit_head(layer)(model.rows_at_depth(out, layer)), dim=-1)
        losses[layer] = ctc_loss(log_probs, x_lengths, targets, target_lengths)
    return losses


def require_one_of(where: str, **options: Any) -> None:
    """Exactly one of ``options`` is not None."""
    given = [name for name, value in options.items() if value is not None]
    if len(given) != 1:
        raise ValueError(
            f"{where} needs exactly one of {' and '.join(options)}, got {', '.join(given) if given else 'neither'}"
        )


@dataclass
class Decisions:
    """What a method decided, in sample order (None where the method decides nothing of the kind).

    Attributes:
        layer_mask: bool ``[B, L]`` the layers each sample ran (layer dropping, selector).
        exit_depth: int64 ``[B]`` the depth each sample exited at: the number of layers it ran
            (early exit).
        skipped_frames: bool ``[B, T']`` frames that skipped the upper layers (blank skip).
    """

    layer_mask: Optional[Tensor] = None
    exit_depth: Optional[Tensor] = None
    skipped_frames: Optional[Tensor] = None


@dataclass
class InferenceResult:
    """``log_probs [B, T', V]``, ``lengths [B]``, the executed-work report and the decisions."""

    log_probs: Tensor
    lengths: Tensor
    report: ExecutedWork
    decisions: Decisions = field(default_factory=Decisions)


Runner = Callable[[CTCModel, Tensor, Tensor, Any], InferenceResult]


def no_model_fields(config: ModelConfig) -> Dict[str, Any]:
    return {}


@dataclass(frozen=True, kw_only=True)
class Method:
    """One dynamic-depth method, as the registry holds it (built by keyword: seven fields read
    better by name than by position).

    Attributes:
        name: the ``--method`` name (and ``runs/<name>``).
        summary: one line for listings.
        budget_type: its :class:`Budget` dataclass.
        run: inference ``(model, x [B, T', D] after the front-end, lengths [B], budget) ->
            InferenceResult``; called by :func:`dynenc.methods.infer` in eval mode, no grad.
        objective: ``(settings, model) -> Objective`` for training.
        budgets: the evaluation sweep of a trained model: ``model -> [(label, budget)]``.
        model_fields: the :class:`ModelConfig` fields the method needs, filled in where the
            given config leaves them unset (e.g. early exit: exit heads after every second layer).
        chooses_layers: whether its budgets pick each sample's layers (a ``layer_mask`` in the
            :class:`Decisions`); only these have layer choices to report.
    """

    name: str
    summary: str
    budget_type: Type[Budget]
    run: Runner
    objective: Callable[[ObjectiveSettings, CTCModel], Objective]
    budgets: Callable[[CTCModel], List[Tuple[str, Budget]]]
    model_fields: Callable[[ModelConfig], Dict[str, Any]] = no_model_fields
    chooses_layers: bool = False


def run_masked(model: CTCModel, x: Tensor, lengths: Tensor, layer_mask: Optional[Tensor]) -> InferenceResult:
    """Inference with a bool ``[B, L]`` layer mask (None = every layer)."""
    log_probs, _, out = model.encode(x, lengths, layer_mask=layer_mask)
    return InferenceResult(log_probs, lengths, out.report, Decisions(layer_mask=layer_mask))
