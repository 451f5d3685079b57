"""The figures of ``dynenc bench``, one module each, and their registry :data:`FIGURES`
(name -> :class:`Figure`, in the order they run and print)."""
from __future__ import annotations

from typing import Dict, Iterable, List

from ..workload import BenchConfig
from . import dld, edge, exits, forward, foundation, latency, ops, peers, roofline, train
from .base import Case, Figure, Ratio, Terms, weighted_terms

FIGURES: Dict[str, Figure] = {figure.name: figure for figure in (
    forward.FIGURE, peers.FIGURE, roofline.FIGURE, train.FIGURE, dld.FIGURE, exits.FIGURE, ops.FIGURE, edge.FIGURE,
    foundation.FIGURE, latency.FIGURE)}


def all_cases(config: BenchConfig, figures: Iterable[str] = FIGURES) -> List[Case]:
    """The cases of ``figures`` (names), in registry order within each figure."""
    return [case for figure in figures for case in FIGURES[figure].cases(config)]


__all__ = ["FIGURES", "Case", "Figure", "Ratio", "Terms", "all_cases", "weighted_terms"]
