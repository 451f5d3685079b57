"""The one table of methods (name -> :class:`Method`) and the one inference entry point.

``dynenc train``, ``dynenc eval``, :func:`infer` and ``python -m dynenc.methods`` (the
listing) read this table. Adding a method = a module defining ``METHOD`` + its
name in ``_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import Dict, Tuple, Type

from torch import Tensor

from ..asr import CTCModel
from .base import Budget, InferenceResult, Method, Runner, frozen

_MODULES = ("static", "layer_drop", "dld", "selector", "early_exit", "blank_skip")

METHODS: Dict[str, Method] = {
    method.name: method for method in (importlib.import_module(f"{__package__}.{name}").METHOD for name in _MODULES)
}


def _runners() -> Dict[Type[Budget], Runner]:
    """Budget type -> inference function; methods sharing a budget type share its function."""
    runners: Dict[Type[Budget], Runner] = {}
    for method in METHODS.values():
        if runners.setdefault(method.budget_type, method.run) is not method.run:
            raise TypeError(
                f"method {method.name!r} runs {method.budget_type.__name__} differently from "
                f"another method with that budget type"
            )
    return runners


_RUNNERS = _runners()


def method_names() -> Tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return METHODS[name]


def infer(model: CTCModel, features: Tensor, lengths: Tensor, budget: Budget) -> InferenceResult:
    """Run ``model`` on ``features [B, T, F]`` (``lengths [B]``) within ``budget``.

    Runs in eval mode without grad and leaves the model as it found it (every submodule's
    training flag restored, no running statistics touched). Returns the log-probabilities,
    the executed-work report and the method's decisions.
    """
    runner = _RUNNERS.get(type(budget))
    if runner is None:
        names = ", ".join(sorted(t.__name__ for t in _RUNNERS))
        raise TypeError(f"budget must be one of {names}, got {type(budget).__name__}")
    budget.check(model)
    with frozen(model):
        x, x_lengths = model.embed(features, lengths)
        return runner(model, x, x_lengths, budget)
