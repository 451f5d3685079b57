"""What an exported graph runs: the fixed-budget plan (:class:`ExportPlan`) and the two graphs,
:class:`FixedBudgetGraph` and :class:`EarlyExitGraph` (see :mod:`dynenc.export`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..asr import CTCModel
from ..asr.features import ROWS_PER_FRAME
from ..methods import (
    BlankSkipBudget,
    Budget,
    EarlyExitBudget,
    FullBudget,
    LayerDropBudget,
    fixed_layers_mask,
    frame_confidence,
    infer,
)
from ..routing import valid_frames

#: Exit criteria a graph can hold: per-frame confidences averaged over the utterance. The
#: authors' ``nbest_posterior`` needs a beam search at every exit: not in a static graph.
GRAPH_CRITERIA = ("max_prob", "entropy")


# ============================================================================ what a graph runs
@dataclass(frozen=True)
class ExportPlan:
    """The fixed budget of one static graph: the ``layers`` that run (sorted 0-based indices)
    and the ``head_depth`` whose CTC head reads the output (after that many layers; the
    model's depth = the final head)."""

    layers: Tuple[int, ...]
    head_depth: int

    def check(self, model: CTCModel) -> None:
        depths = model.config.head_depths
        if self.head_depth not in depths:
            raise ValueError(f"head_depth must be one of the model's head depths {list(depths)}, got {self.head_depth}")
        if not set(self.layers) <= set(range(self.head_depth)) or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"layers must be distinct 0-based layers in [0, {self.head_depth - 1}] (below the "
                f"head's depth {self.head_depth}), got {list(self.layers)}"
            )


def layers_plan(model: CTCModel, layers: Sequence[int]) -> ExportPlan:
    """The plan running the given 0-based ``layers`` with the final CTC head."""
    if isinstance(layers, (str, bytes)) or not all(isinstance(n, int) and not isinstance(n, bool) for n in layers):
        raise TypeError(f"layers must be a sequence of ints (0-based layers), got {layers!r}")
    plan = ExportPlan(tuple(sorted(layers)), model.config.num_layers)
    plan.check(model)
    return plan


def budget_plan(
    model: CTCModel, budget: Budget, features: Optional[Tensor] = None, lengths: Optional[Tensor] = None
) -> ExportPlan:
    """The :class:`ExportPlan` equal to ``budget`` (a :mod:`dynenc.methods` budget).

    Budgets that decide per input (a selector's k, random layer dropping, an early-exit
    threshold) need the ONE utterance they are decided for: ``features [1, T, F]`` and
    ``lengths [1]``; the graph then runs that utterance's decision for any input. CTC-blank
    frame skipping decides per frame: no static graph expresses it.
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a dynenc.methods budget, got {type(budget).__name__}")
    if isinstance(budget, BlankSkipBudget):
        raise ValueError("a BlankSkipBudget decides per frame at run time: it cannot be exported as a static graph")
    budget.check(model)
    num_layers = model.config.num_layers
    if isinstance(budget, FullBudget):
        return ExportPlan(tuple(range(num_layers)), num_layers)
    if isinstance(budget, EarlyExitBudget) and budget.fixed_exit is not None:
        return ExportPlan(tuple(range(budget.fixed_exit)), budget.fixed_exit)
    if isinstance(budget, LayerDropBudget) and budget.strategy != "random":
        mask = fixed_layers_mask(num_layers, budget.layers, 1, budget.strategy)[0]
        return ExportPlan(tuple(int(i) for i in mask.nonzero().flatten()), num_layers)
    if features is None or lengths is None or features.dim() != 3 or features.shape[0] != 1:
        raise ValueError(
            f"a {type(budget).__name__} decides per utterance: pass the ONE utterance it is exported "
            f"for (features [1, T, F] and lengths [1]), or export runtime early exit (EarlyExitGraph)"
        )
    decisions = infer(model, features, lengths, budget).decisions
    if decisions.exit_depth is not None:
        exit_depth = int(decisions.exit_depth[0])
        return ExportPlan(tuple(range(exit_depth)), exit_depth)
    if decisions.layer_mask is None:
        raise ValueError(
            f"a {type(budget).__name__} decided neither the layers nor an exit: no static graph expresses it"
        )
    return ExportPlan(tuple(int(i) for i in decisions.layer_mask[0].nonzero().flatten()), num_layers)


def _layer_span(model: CTCModel, executed: Sequence[int], start: int, stop: int) -> nn.Module:
    """The padded twin of the encoder (:meth:`~dynenc.engine.RoutedEncoder.padded`) running
    layers ``start..stop - 1`` (0-based) of which only ``executed`` compute. Layers outside the
    span are left out of the module, so they are not in the graph at all."""
    return model.encoder.padded(list(executed), start, stop)


def _input_layout(model: CTCModel) -> Tuple[int, int]:
    """``(features per row, rows per 10 ms frame)`` of what the model reads: ``(F, 1)`` for
    fbank, ``(1, 160)`` for 16 kHz waveforms ``[B, S, 1]``."""
    if model.config.input_features == "waveform":
        return 1, ROWS_PER_FRAME["waveform"]
    return model.config.num_features, 1


def _masked_mean(values: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``values [B, T]`` over each utterance's valid frames -> ``[B]`` (0 when empty)."""
    valid = valid_frames(lengths, values.shape[1]).to(values.dtype)
    return (values * valid).sum(1) / lengths.clamp_min(1).to(values.dtype)


# ============================================================================ graphs
class FixedBudgetGraph(nn.Module):
    """``(features [B, T, F], lengths [B] int64) -> (log_probs [B, T', V], lengths [B])``:
    the front-end, the plan's layers and the head at ``plan.head_depth`` (shared parameters)."""

    def __init__(self, model: CTCModel, plan: ExportPlan) -> None:
        super().__init__()
        plan.check(model)
        self.plan = plan
        self.num_features, self.rows_per_frame = _input_layout(model)
        self.frontend = model.frontend
        self.encoder: Any = _layer_span(model, plan.layers, 0, plan.head_depth)
        self.head = model.exit_head(plan.head_depth)
        self.eval()  # inference only (the padded twin refuses training mode)

    def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        x, lengths = self.frontend(features, lengths)
        x, _ = self.encoder(x, lengths)
        return F.log_softmax(self.head(self.encoder.finish(x, lengths)), dim=-1), lengths

    def metadata(self) -> Dict[str, str]:
        return {
            "dynenc.graph": "fixed_budget",
            "dynenc.layers": " ".join(map(str, self.plan.layers)),
            "dynenc.head_depth": str(self.plan.head_depth),
        }


class EarlyExitGraph(nn.Module):
    """Runtime early exit for one utterance: ``(features [1, T, F], lengths [1] int64,
    threshold [] float32) -> (log_probs [1, T', V], lengths [1], exit_depth [1] int64)``.

    At each exit depth e < L (after e layers) the utterance stops when the mean over its valid frames of
    ``frame_confidence(log_softmax(head_e(x)), criterion)`` is ``>= threshold`` — what
    :class:`~dynenc.methods.EarlyExitBudget` decides in eager mode; otherwise the next span of
    layers runs (a nested ``torch.cond``, so later layers are never computed after an exit).
    """

    def __init__(self, model: CTCModel, criterion: str = "max_prob") -> None:
        super().__init__()
        if criterion not in GRAPH_CRITERIA:
            raise ValueError(
                f"criterion must be one of {GRAPH_CRITERIA} (the N-best posterior needs a beam search, "
                f"which no static graph holds), got {criterion!r}"
            )
        self.exit_depths = model.config.head_depths
        if len(self.exit_depths) == 1:
            raise ValueError("runtime early exit needs a model with early-exit heads (ModelConfig.exit_depths)")
        self.criterion = criterion
        self.num_features, self.rows_per_frame = _input_layout(model)
        self.frontend = model.frontend
        every_layer = range(model.config.num_layers)
        starts = (0,) + self.exit_depths[:-1]
        self.spans = nn.ModuleList(
            _layer_span(model, every_layer, start, stop) for start, stop in zip(starts, self.exit_depths)
        )
        self.heads = nn.ModuleList(model.exit_head(depth) for depth in self.exit_depths)
        self.eval()  # inference only (the padded twin refuses training mode)

    def forward(self, features: Tensor, lengths: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x, lengths = self.frontend(features, lengths)
        log_probs, exit_depth = self._from_span(0, x, lengths, threshold)
        return log_probs, lengths, exit_depth

    def _from_span(self, index: int, x: Tensor, lengths: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor]:
        """Run span ``index`` and the ones after it until an exit; ``(log_probs, exit_depth)``."""
        x, _ = self.spans[index](x, lengths)
        span: Any = self.spans[index]
        log_probs = F.log_softmax(self.heads[index](span.finish(x, lengths)), dim=-1)
        exit_depth = torch.full((1,), self.exit_depths[index], dtype=torch.int64)
        if index == len(self.spans) - 1:
            return log_probs, exit_depth
        confidence = _masked_mean(frame_confidence(log_probs, self.criterion), lengths)

        def stop(x: Tensor, lengths: Tensor, log_probs: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor]:
            return log_probs.clone(), exit_depth.clone()  # a branch may not return its inputs themselves

        def go_on(x: Tensor, lengths: Tensor, log_probs: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor]:
            return self._from_span(index + 1, x, lengths, threshold)

        return torch.cond((confidence >= threshold).all(), stop, go_on, (x, lengths, log_probs, threshold))

    def metadata(self) -> Dict[str, str]:
        return {
            "dynenc.graph": "early_exit",
            "dynenc.exit_depths": " ".join(map(str, self.exit_depths)),
            "dynenc.criterion": self.criterion,
        }


def fixed_budget_graph(
    model: CTCModel,
    budget: Optional[Budget] = None,
    *,
    layers: Optional[Sequence[int]] = None,
    features: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> FixedBudgetGraph:
    """The static graph of ``budget`` (see :func:`budget_plan`) or of the 0-based ``layers``
    with the final head (exactly one of the two), in eval mode."""
    if layers is not None and budget is None:
        plan = layers_plan(model, layers)
    elif budget is not None and layers is None:
        plan = budget_plan(model, budget, features, lengths)
    else:
        raise ValueError("fixed_budget_graph needs exactly one of budget and layers")
    return FixedBudgetGraph(model, plan)
