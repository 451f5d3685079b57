"""``forward``: inference forward of the encoder on the spread-length batch —
proportionality (time vs active fraction) and padding waste against the padded peers."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import dynenc

from ..harness import Prepared
from ..workload import BenchConfig, Workload, depth_mask, masked_forward
from .base import Builder, Case, Figure, Ratio, fraction_label, under_backend, under_inference


def _torchaudio(w: Workload) -> Prepared:
    static, _ = w.models
    x, lengths = w.input
    return Prepared(under_inference(lambda: static(x, lengths), static),
                    dict(active=1.0, computed=w.padded_fraction))


def _masked(fraction: float) -> Builder:
    def build(w: Workload) -> Prepared:
        static, _ = w.models
        x, lengths = w.input
        mask = depth_mask(w.depth(fraction), w.num_layers)
        return Prepared(under_inference(lambda: masked_forward(static, x, lengths, mask), static),
                        dict(active=w.token_fraction(mask), computed=w.padded_fraction))

    return build


def _dynenc(fraction: float, backend: str = "native", drop: bool = False) -> Builder:
    """dynenc at active fraction f: per-sample depths (sorted prefix routes), or per-sample
    random layer subsets (``drop``: gather/scatter routes)."""

    def build(w: Workload) -> Prepared:
        _, dynamic = w.models
        x, lengths = w.input
        if fraction >= 1:
            routing = {}
        elif drop:
            routing = dict(layer_mask=w.drop_mask(fraction))
        else:
            routing = dict(depth=w.depth(fraction))
        run = under_backend(backend, under_inference(lambda: dynamic(x, lengths, **routing), dynamic))
        with dynenc.use_backend(backend):
            report = under_inference(lambda: dynamic(x, lengths, return_report=True, **routing).report, dynamic)()
            full = under_inference(lambda: dynamic(x, lengths, return_report=True).report, dynamic)()
        return Prepared(run, dict(active=report.executed_fraction, computed=report.executed_fraction,
                                  flops=report.flops / full.flops))

    return build


def masked_fractions(config: BenchConfig) -> List[float]:
    """The fractions the masked peer runs at: every fraction in a full run; else only the one
    nearest 0.5 (its padding ratio's): it costs a padded full forward at any fraction."""
    if config.full:
        return list(config.fractions)
    return [min(config.fractions, key=lambda f: (abs(f - 0.5), f))]


def cases(config: BenchConfig) -> List[Case]:
    """Every peer, dynenc at every active fraction (per-sample random depths), plus
    per-sample LD masks at f = 0.5 and one reference-backend row (the plain-PyTorch ops are
    slow). The masked peer at :func:`masked_fractions`."""
    result = [Case("forward", "torchaudio", "torchaudio", _torchaudio)]
    for f in masked_fractions(config):
        result.append(Case("forward", f"masked {fraction_label(f)}", "masked", _masked(f)))
    for f in config.fractions:
        result.append(Case("forward", f"dynenc {fraction_label(f)}", "dynenc", _dynenc(f)))
    result.append(Case("forward", "dynenc LD f=0.50", "dynenc", _dynenc(0.5, drop=True)))
    result.append(Case("forward", "dynenc-reference f=1.00", "dynenc-reference", _dynenc(1.0, "reference")))
    return result


def ratios(config: BenchConfig) -> List[Ratio]:
    full = "forward/dynenc f=1.00"

    def proportional(key: str) -> Callable[[Dict[str, Dict[str, Any]]], float]:
        return lambda infos: infos[key]["active"] + 0.03  # f = the executed token x layer fraction

    result = [Ratio("proportionality", f"dynenc {fraction_label(f)} / dynenc full",
                    f"forward/dynenc {fraction_label(f)}", full,
                    target=proportional(f"forward/dynenc {fraction_label(f)}"), note="per-sample random depths")
              for f in sorted(config.fractions, reverse=True) if f < 1]
    result += [
        Ratio("proportionality", "dynenc LD f=0.50 / dynenc full", "forward/dynenc LD f=0.50", full,
              target=proportional("forward/dynenc LD f=0.50"),
              note="per-sample random layer subsets (gather/scatter routes)"),
        Ratio("padding", "dynenc full / torchaudio", full, "forward/torchaudio", target=0.70),
        Ratio("padding", "dynenc f=0.50 / torchaudio", "forward/dynenc f=0.50", "forward/torchaudio",
              target=0.38),
        Ratio("padding", "masked f=0.50 / torchaudio", "forward/masked f=0.50", "forward/torchaudio",
              note="today's practice saves nothing"),
        Ratio("backends", "dynenc-reference / dynenc (native)", "forward/dynenc-reference f=1.00", full),
    ]
    return result


FIGURE = Figure("forward", cases, ratios)
