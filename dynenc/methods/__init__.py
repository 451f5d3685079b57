"""The dynamic-depth methods, one module each (static, layer_drop, dld, selector,
early_exit, blank_skip), each a small policy on the one routing mechanism with its own
training objective, typed budget and inference function; :mod:`.registry` holds the table
of them and :func:`infer`, the one inference entry point."""

from .base import Budget, Decisions, InferenceResult, Method
from .blank_skip import BlankSkipBudget, BlankSkipObjective, BlankSkipPolicy, dilate_within_sequences
from .dld import DLDObjective
from .early_exit import CRITERIA, EarlyExitBudget, EarlyExitObjective, EarlyExitPolicy, ExitDecision, frame_confidence
from .layer_drop import LayerDropBudget, LayerDropCTC, RandomLayerDrop, fixed_layers_mask, linear_drop_schedule
from .registry import METHODS, get_method, infer, method_names
from .selector import (
    SelectorBudget,
    SelectorObjective,
    budget_regulariser,
    relaxed_topk,
    straight_through_topk,
    threshold_mask,
    topk_mask,
)
from .static import FullBudget, StaticCTC

__all__ = [
    "BlankSkipBudget",
    "BlankSkipObjective",
    "BlankSkipPolicy",
    "Budget",
    "CRITERIA",
    "DLDObjective",
    "Decisions",
    "EarlyExitBudget",
    "EarlyExitObjective",
    "EarlyExitPolicy",
    "ExitDecision",
    "FullBudget",
    "InferenceResult",
    "LayerDropBudget",
    "LayerDropCTC",
    "METHODS",
    "Method",
    "RandomLayerDrop",
    "SelectorBudget",
    "SelectorObjective",
    "StaticCTC",
    "budget_regulariser",
    "dilate_within_sequences",
    "fixed_layers_mask",
    "frame_confidence",
    "get_method",
    "infer",
    "linear_drop_schedule",
    "method_names",
    "relaxed_topk",
    "straight_through_topk",
    "threshold_mask",
    "topk_mask",
]
