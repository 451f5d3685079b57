"""The dynamic-depth methods, each a small policy on the one routing mechanism:
random layer dropping, DLD, input-conditioned layer selection, CTC-blank frame skipping,
early exits; and the one budget API for inference."""
from .blank_skip import BlankHead, BlankSkipPolicy
from .budget import METHODS, Budget, InferenceResult, infer
from .early_exit import EarlyExitPolicy, frame_confidence
from .layer_drop import RandomLayerDrop, fixed_layers_mask, linear_drop_schedule
from .objectives import (BlankSkipObjective, DLDObjective, EarlyExitObjective, LayerDropCTC, SelectorObjective,
                         StaticCTC)
from .selector import LayerSelector, budget_regulariser, straight_through_topk, threshold_mask, topk_mask

__all__ = [
    "BlankHead", "BlankSkipObjective", "BlankSkipPolicy", "Budget", "DLDObjective", "EarlyExitObjective",
    "EarlyExitPolicy", "InferenceResult", "LayerDropCTC", "LayerSelector", "METHODS", "RandomLayerDrop",
    "SelectorObjective", "StaticCTC", "budget_regulariser", "fixed_layers_mask", "frame_confidence", "infer",
    "linear_drop_schedule", "straight_through_topk", "threshold_mask", "topk_mask",
]
