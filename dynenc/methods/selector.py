"""Input-conditioned layer selection (arXiv 2507.07954): the model's
:class:`~dynenc.asr.heads.LayerSelector` scores every layer from the encoder's input; top-k
(or a threshold) picks each sample's layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union, cast

import torch
from torch import Tensor

from ..asr import CTCModel, LayerSelector, ctc_loss
from ..asr.config import ModelConfig
from ..validation import check_int, check_real
from . import layer_drop
from .base import Batch, Budget, InferenceResult, Logs, Method, ObjectiveSettings, require_one_of, run_masked

SELECTOR_HIDDEN = 64  # the selector's width when the config names none


def topk_mask(logits: Tensor, k: Union[int, Tensor]) -> Tensor:
    """bool ``[B, L]``: the ``k`` highest-scoring layers per sample (k int or int ``[B]``)."""
    num_layers = logits.shape[1]
    k = torch.as_tensor(k, device=logits.device).expand(logits.shape[0])
    if ((k < 0) | (k > num_layers)).any():
        raise ValueError(f"k must lie in [0, {num_layers}], got {k.tolist()}")
    rank = logits.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each layer
    return rank < k[:, None]


def threshold_mask(logits: Tensor, threshold: float) -> Tensor:
    """bool ``[B, L]``: layers whose selection probability ``sigmoid(logit)`` exceeds ``threshold``."""
    return torch.sigmoid(logits) > threshold


def relaxed_topk(scores: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Continuous relaxation of the k-hot top-k of ``scores [B, L]`` (Xie & Ermon 2019,
    "Reparameterizable subset sampling via continuous relaxations"): k successive softmaxes,
    each after down-weighting what the previous ones picked. Rows sum to k; as the temperature
    goes to 0 it becomes the hard top-k."""
    khot = torch.zeros_like(scores)
    picked = torch.zeros_like(scores)
    for _ in range(k):
        scores = scores + torch.log1p(-picked.clamp(max=1 - 1e-6))
        picked = torch.softmax(scores / temperature, dim=1)
        khot = khot + picked
    return khot


def straight_through_topk(
    logits: Tensor, k: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """Training-time selection (*choice*): Gumbel top-k with a straight-through relaxed top-k.

    ``logits + Gumbel`` noise sampled this way makes the hard top-k a sample of k layers
    without replacement from ``softmax(logits)`` (the Gumbel top-k trick). The hard top-k
    drives the ragged execution (gates exactly 1 on the selected layers in the forward); the
    backward uses the gradient of :func:`relaxed_topk` of the same perturbed scores, so every
    layer's logit — selected or not — gets a learning signal through the softmaxes.

    Returns ``(mask bool [B, L], gates [B, L])``.
    """
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator).clamp(1e-9, 1 - 1e-9)
    scores = logits - torch.log(-torch.log(uniform))
    mask = topk_mask(scores.detach(), k)
    soft = relaxed_topk(scores, k, temperature)
    return mask, mask.to(soft.dtype) + soft - soft.detach()


def budget_regulariser(logits: Tensor, k: Union[int, Tensor]) -> Tensor:
    """Squared gap between the expected number of selected layers and the budget k."""
    k = torch.as_tensor(k, device=logits.device, dtype=logits.dtype)
    return ((torch.sigmoid(logits).sum(1) - k) ** 2).mean()


def _selector(model: CTCModel, what: str) -> LayerSelector:
    """``model``'s layer selector; ``ValueError`` naming ``what`` when it has none."""
    if model.selector is None:
        raise ValueError(f"{what} needs a model with a layer selector (ModelConfig.selector_hidden > 0)")
    return model.selector


class SelectorObjective:
    """Training (*choice*): a budget k drawn per batch from ``[min_layers, L]`` and given to the
    selector; Gumbel top-k with straight-through relaxed top-k gates (see
    :func:`straight_through_topk`) so the hard mask runs ragged while gradients reach the
    selector; plus a budget regulariser pulling ``sum sigmoid(logits)`` toward k, which trains
    threshold mode toward the same target (set ``regulariser_weight=0`` to train through the
    straight-through path alone)."""

    def __init__(self, min_layers: int = 1, regulariser_weight: float = 0.01, temperature: float = 1.0) -> None:
        self.min_layers = min_layers
        self.regulariser_weight = regulariser_weight
        self.temperature = temperature

    def __call__(self, model: CTCModel, batch: Batch) -> Tuple[Tensor, Logs]:
        selector = _selector(model, "SelectorObjective")
        features, lengths, targets, target_lengths = batch
        k = int(torch.randint(self.min_layers, model.config.num_layers + 1, ()))  # torch RNG: resumable
        x, x_lengths = model.embed(features, lengths)
        logits = selector(x, x_lengths, k)
        mask, gates = straight_through_topk(logits, k, self.temperature)
        log_probs, _, _ = model.encode(x, x_lengths, layer_mask=mask, gates=gates)
        ctc = ctc_loss(log_probs, x_lengths, targets, target_lengths)
        reg = budget_regulariser(logits, k)
        return ctc + self.regulariser_weight * reg, {"ctc": ctc.item(), "budget_reg": reg.item(), "k": float(k)}


@dataclass(frozen=True)
class SelectorBudget(Budget):
    """Exactly one of: ``k`` (the k top-scoring layers per sample, k in ``[0, L]``; the selector
    is told k) or ``threshold`` (the layers with ``sigmoid(logit) > threshold``, threshold in
    (0, 1), the selector told ``target`` layers — default L — which training's budget
    regulariser taught it to spend in expectation)."""

    k: Optional[int] = None
    threshold: Optional[float] = None
    target: Optional[int] = None

    def __post_init__(self) -> None:
        require_one_of("SelectorBudget", k=self.k, threshold=self.threshold)
        if self.k is not None:
            check_int("SelectorBudget.k", self.k, low=0)
            if self.target is not None:
                raise ValueError("SelectorBudget.target is the threshold mode's budget; with k, the budget is k")
        else:
            if not 0 < check_real("SelectorBudget.threshold", self.threshold) < 1:
                raise ValueError(f"SelectorBudget.threshold must lie in (0, 1), got {self.threshold}")
            if self.target is not None:
                check_int("SelectorBudget.target", self.target, low=0)

    def check(self, model: CTCModel) -> None:
        _selector(model, "a SelectorBudget")
        for name in ("k", "target"):
            if getattr(self, name) is not None:
                check_int(f"SelectorBudget.{name}", getattr(self, name), low=0, high=model.config.num_layers)


def run(model: CTCModel, x: Tensor, lengths: Tensor, budget: SelectorBudget) -> InferenceResult:
    selector = _selector(model, "a SelectorBudget")
    if budget.k is not None:
        mask = topk_mask(selector(x, lengths, budget.k), budget.k)
    else:
        target = model.config.num_layers if budget.target is None else budget.target
        mask = threshold_mask(selector(x, lengths, target), cast(float, budget.threshold))
    return run_masked(model, x, lengths, mask)


def budgets(model: CTCModel) -> List[Tuple[str, Budget]]:
    """Top-k for k = L..1, then the controls on the same backbone (paper 001 compares the
    selector with random dropping): layer dropping's evenly spaced and random layers."""
    num_layers = model.config.num_layers
    controls = [(label, budget) for label, budget in layer_drop.budgets(model) if label != f"n={num_layers}"]
    return [(f"k={k}", SelectorBudget(k=k)) for k in range(num_layers, 0, -1)] + controls


def objective(settings: ObjectiveSettings, model: CTCModel) -> SelectorObjective:
    return SelectorObjective(min_layers=1)


def model_fields(config: ModelConfig) -> Dict[str, Any]:
    return {} if config.selector_hidden else {"selector_hidden": SELECTOR_HIDDEN}


METHOD = Method(
    name="selector",
    summary="input-conditioned layer selection (top-k of a learned selector)",
    budget_type=SelectorBudget,
    run=run,
    objective=objective,
    budgets=budgets,
    model_fields=model_fields,
    chooses_layers=True,
)
