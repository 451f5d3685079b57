"""``peers``: full-depth inference on the spread-length batch against what a user would pick
instead of dynenc — torchaudio eager (padded), torchaudio under ``torch.compile``, torchaudio
on length-sorted sub-batches (4 buckets, what a bucketing sampler gives) — and dynenc eager and
(full run only: a second compile, no target) compiled. Compile time is reported separately
(``compile_s``), never inside a timing."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, List

import torch
from torch import Tensor, nn

from ..harness import Prepared
from ..workload import BenchConfig, Workload
from .base import Case, Figure, Ratio, quiet_loggers, under_inference

BUCKETS = 4


def dynamic_shape_capture():
    """dynenc's routing has data-dependent sizes: dynamo must capture ``.item()`` and ops
    whose output shapes depend on data (as in the registry's compile test)."""
    return torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)


def _compiled(module: nn.Module, x: Tensor, lengths: Tensor, config=contextlib.nullcontext) -> Prepared:
    compiled = torch.compile(module)

    def run():
        with config():
            return compiled(x, lengths)

    start = time.perf_counter()
    # The compile, outside every timing. Quiet: dynamo warns of each graph break (torchaudio's
    # ``lengths.max().item()``; dynenc's ``record_function`` ranges, which it ignores) and
    # inductor's first C++ build of the CPU kernels warns that no CUDA runtime is found. Both
    # are expected here, and they would print into the progress bar; errors still surface.
    with quiet_loggers("torch._dynamo", "torch.utils.cpp_extension"):
        under_inference(run, module)()
    return Prepared(under_inference(run, module), dict(active=1.0, compile_s=time.perf_counter() - start))


def _torchaudio_compiled(w: Workload) -> Prepared:
    return _compiled(w.models[0], *w.input)


def _dynenc_compiled(w: Workload) -> Prepared:
    return _compiled(w.models[1], *w.input, config=dynamic_shape_capture)


def bucketed(static: nn.Module, x: Tensor, lengths: Tensor, buckets: int = BUCKETS) -> Callable[[], List[Tensor]]:
    """torchaudio on ``buckets`` sub-batches of length-sorted samples, each padded only to its
    own longest sample."""
    order = lengths.argsort(descending=True)
    groups = [group for group in order.chunk(buckets) if group.numel()]
    inputs = [(x[group, : int(lengths[group].max())], lengths[group]) for group in groups]
    return lambda: [static(batch, batch_lengths)[0] for batch, batch_lengths in inputs]


def _torchaudio_bucketed(w: Workload) -> Prepared:
    static = w.models[0]
    x, lengths = w.input
    computed = sum(int(lengths[g].max()) * g.numel() for g in lengths.argsort(descending=True).chunk(BUCKETS))
    return Prepared(under_inference(bucketed(static, x, lengths), static),
                    dict(active=1.0, computed=computed / int(lengths.sum())))


def _eager(index: int) -> Callable[[Workload], Prepared]:
    def build(w: Workload) -> Prepared:
        module = w.models[index]
        x, lengths = w.input
        return Prepared(under_inference(lambda: module(x, lengths), module), dict(active=1.0))

    return build


def cases(config: BenchConfig) -> List[Case]:
    result = [
        Case("peers", "torchaudio eager", "torchaudio", _eager(0)),
        Case("peers", "torchaudio compiled", "torchaudio", _torchaudio_compiled),
        Case("peers", f"torchaudio bucketed x{BUCKETS}", "torchaudio", _torchaudio_bucketed),
        Case("peers", "dynenc eager", "dynenc", _eager(1)),
    ]
    if config.full:  # no target; its compile is a third of the figure's time
        result.append(Case("peers", "dynenc compiled", "dynenc", _dynenc_compiled))
    return result


def ratios(config: BenchConfig) -> List[Ratio]:
    dynenc = "peers/dynenc eager"
    result = [
        Ratio("peers", "dynenc / torchaudio eager", dynenc, "peers/torchaudio eager", target=0.45),
        Ratio("peers", "dynenc / torchaudio compiled", dynenc, "peers/torchaudio compiled", target=0.50),
        Ratio("peers", f"dynenc / torchaudio bucketed x{BUCKETS}", dynenc, f"peers/torchaudio bucketed x{BUCKETS}",
              target=0.50),
    ]
    if config.full:
        result.append(Ratio("peers", "dynenc compiled / dynenc eager", "peers/dynenc compiled", dynenc))
    return result


FIGURE = Figure("peers", cases, ratios)
