"""What a figure is made of: :class:`Case` (one thing to time), :class:`Ratio` (medians ->
the ratios the README quotes, against targets) and :class:`Figure` (a named set of both),
plus the wrappers the figures share, and :func:`quiet_loggers` / :func:`without_root_warning`,
which keep third-party chatter out of the bench's output around the calls that cause it."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Tuple, Union

import torch
from torch import nn

import dynenc

from ..harness import Prepared
from ..workload import BenchConfig, Workload

Builder = Callable[[Workload], Prepared]


@dataclass(frozen=True)
class Case:
    """One benchmark: ``build(workload)`` returns the :class:`Prepared` callable to time.
    ``runs_on(device)``: whether the case exists on a device (a CUDA-only kernel is skipped
    elsewhere, not failed)."""

    figure: str
    name: str
    peer: str
    build: Builder = field(compare=False)
    runs_on: Callable[[torch.device], bool] = field(default=lambda device: True, compare=False)

    @property
    def key(self) -> str:
        return f"{self.figure}/{self.name}"


#: A case key, or weighted case keys ``((key, weight), ...)`` summed.
Terms = Union[str, Tuple[Tuple[str, float], ...]]


def weighted_terms(terms: Terms) -> Tuple[Tuple[str, float], ...]:
    return ((terms, 1.0),) if isinstance(terms, str) else terms


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of case medians (each a weighted sum of cases), against
    a target.

    ``figure`` is the label of the ratio's group in the tables (a figure may group its
    ratios under several labels). ``target`` is a number, a function of the prepared infos
    (for targets that depend on a measured fraction), or None (reported, no target).
    ``metric`` ``"time"`` compares medians, ``"saved"`` compares saved-activation bytes,
    ``"peak"`` the peak bytes a step allocates (``peak_mb``), ``"ms"`` no ratio: the
    numerator's weighted sum of medians in ms (an absolute cost, e.g. a fit's coefficient;
    ``denominator`` is ``()``), against a target in ms.
    """

    figure: str
    name: str
    numerator: Terms
    denominator: Terms
    target: Any = None
    metric: str = "time"
    note: str = ""


@dataclass(frozen=True)
class Figure:
    """A figure of ``dynenc bench``: its cases and ratios for a config. ``per_token``:
    its rows report valid input frames per second (model figures, not micro-benchmarks)."""

    name: str
    cases: Callable[[BenchConfig], List[Case]]
    ratios: Callable[[BenchConfig], List[Ratio]]
    per_token: bool = True


def fraction_label(fraction: float) -> str:
    return f"f={fraction:.2f}"


def under_inference(fn: Callable[[], Any], *modules: nn.Module) -> Callable[[], Any]:
    """``fn`` under ``torch.inference_mode`` with ``modules`` in eval mode (the training
    figure leaves them in training mode; setting the mode costs microseconds)."""

    def run() -> Any:
        for module in modules:
            module.eval()
        with torch.inference_mode():
            return fn()

    return run


def under_backend(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with dynenc's ops on ``backend`` (``"native"`` or ``"reference"``)."""

    def run() -> Any:
        with dynenc.use_backend(backend):
            return fn()

    return run


# ============================================================================ third-party output
@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """The loggers ``names`` (and their children that keep the default level) drop records
    below ``level`` inside the block; their levels are restored after it.

    A logger the user made more verbose (e.g. ``TORCH_LOGS=dynamo``: its effective level is
    below WARNING) is left alone: whoever asked for the logs gets them."""
    loggers = [logger for logger in map(logging.getLogger, names) if logger.getEffectiveLevel() >= logging.WARNING]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)


@contextlib.contextmanager
def without_root_warning(prefix: str) -> Iterator[None]:
    """Inside the block, records on the root logger whose message starts with ``prefix`` are
    dropped; other records are handled as without the block.

    For libraries that call ``logging.warning(...)`` (the root logger) themselves: on a root
    logger without handlers that call also runs ``logging.basicConfig()``, which would print
    every later root-propagated record of the process. Inside the block the root logger gets
    :data:`logging.lastResort` as its handler (what records without a handler reach anyway),
    so no ``basicConfig()`` happens."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    handler = logging.lastResort if not root.handlers and logging.lastResort is not None else None
    root.addFilter(keep)
    if handler is not None:
        root.addHandler(handler)
    try:
        yield
    finally:
        root.removeFilter(keep)
        if handler is not None:
            root.removeHandler(handler)
