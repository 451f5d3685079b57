"""``edge``: per-utterance latency as an edge user sees it — batch size 1, 1 and 2 threads —
for eager dynenc, and for the exported fixed-budget graph (:mod:`dynenc.export`) under ONNX
Runtime in fp32 and with dynamic-int8 linears, at budgets of n = f * L layers (every other
layer, final head); front-end included. Random weights: latency only (no WER).

Setup exports one ONNX graph per budget (dynamic shapes, as ``dynenc export`` writes them):
the slow part of this figure (6-18 s per budget on 2 cores, the first the slowest). The default
run times two budgets (n = L and the one nearest L/2), a full run one per fraction
(:func:`budget_layers`)."""
from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from dynenc import export
from dynenc.asr import CTCModel
from dynenc.methods import LayerDropBudget, infer

from ..harness import Prepared
from ..workload import QUICK, BenchConfig, Workload
from .base import Case, Figure, Ratio, quiet_loggers, under_inference, without_root_warning

THREADS = (1, 2)
PRECISIONS = ("fp32", "int8")


def layer_counts(num_layers: int, fractions: Sequence[float]) -> List[int]:
    """n layers per budget: ``round(f * L)`` (at least 1) for each fraction, distinct,
    deepest first (also ``python -m recipes.synthetic_speech deploy``'s default budgets)."""
    return sorted({max(1, round(f * num_layers)) for f in fractions}, reverse=True)


def budget_layers(config: BenchConfig) -> List[int]:
    """:func:`layer_counts` of the bench model and fractions in a full run. Each budget costs an
    export, so at the smoke sizes (``--quick``'s model) only the deepest and the shallowest, and
    in the default run the deepest and the one nearest L/2."""
    budgets = layer_counts(config.model.num_layers, config.fractions)
    if config.model == QUICK.model:
        return sorted({budgets[0], budgets[-1]}, reverse=True)
    if not config.full:
        half = min(budgets, key=lambda n: (abs(n - config.model.num_layers / 2), n))
        return sorted({budgets[0], half}, reverse=True)
    return budgets


@functools.lru_cache(maxsize=None)
def _cpu_model(w: Workload) -> CTCModel:
    """The workload's CTC model on the CPU (the edge case, also in a CUDA run)."""
    return w.ctc_model if w.device.type == "cpu" else copy.deepcopy(w.ctc_model).cpu()


def _utterance(w: Workload) -> Tuple[torch.Tensor, torch.Tensor]:
    """The speech batch's longest utterance alone: features ``[1, T, F]``, lengths ``[1]``."""
    features, lengths = w.speech_batch[:2]
    longest = int(lengths.argmax())
    return features[longest:longest + 1, :int(lengths[longest])].cpu(), lengths[longest:longest + 1].cpu()


@functools.lru_cache(maxsize=None)
def _onnx_files(w: Workload, layers: int) -> Dict[str, Path]:
    """The budget's fp32 ONNX graph and its int8 copy, in a directory that lives as long as
    the process (kept per workload: the fp32 and int8 cases of every thread count share it)."""
    directory = Path(_scratch().name)
    fp32 = directory / f"{id(w)}_n{layers}.onnx"
    # torch.onnx's op registry warns, on every export, that torchvision's ops (nms, roi_align,
    # ...) are skipped because torchvision is not installed: none is in these graphs.
    with quiet_loggers("torch.onnx._internal.exporter._registration"):
        export.save(export.fixed_budget_graph(_cpu_model(w), LayerDropBudget(layers)), fp32)
    # ONNX Runtime's quantize_dynamic asks (root logger) for its optional pre-processing pass
    # (shape inference + graph optimisation before quantising); export.quantize_int8 quantises
    # the exported graph as it is, on purpose.
    with without_root_warning("Please consider to run pre-processing before quantization"):
        int8 = export.quantize_int8(fp32, fp32.with_suffix(".int8.onnx"))
    return {"fp32": fp32, "int8": int8}


@functools.lru_cache(maxsize=None)
def _scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dynenc_edge_")


def _on_threads(threads: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with torch on ``threads`` intra-op threads (the caller's count restored)."""

    def run() -> Any:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(previous)

    return run


def _eager(layers: int, threads: int) -> Callable[[Workload], Prepared]:
    def build(w: Workload) -> Prepared:
        model = _cpu_model(w)
        features, lengths = _utterance(w)
        run = _on_threads(threads, under_inference(lambda: infer(model, features, lengths, LayerDropBudget(layers)),
                                                   model))
        return Prepared(run, dict(active=layers / w.num_layers, threads=threads))

    return build


def _onnx_runtime(layers: int, threads: int, precision: str) -> Callable[[Workload], Prepared]:
    def build(w: Workload) -> Prepared:
        features, lengths = _utterance(w)
        session = export.onnx_session(_onnx_files(w, layers)[precision], threads)
        log_probs = export.run_onnx(session, features, lengths)[0]
        eager = infer(_cpu_model(w), features, lengths, LayerDropBudget(layers)).log_probs
        difference = float((torch.from_numpy(log_probs) - eager).abs().max())
        return Prepared(lambda: export.run_onnx(session, features, lengths),
                        dict(active=layers / w.num_layers, threads=threads, max_abs_diff=difference))

    return build


def _name(peer: str, layers: int, threads: int) -> str:
    return f"{peer} n={layers} t={threads}"


def _key(peer: str, layers: int, threads: int) -> str:
    return f"edge/{_name(peer, layers, threads)}"


def cases(config: BenchConfig) -> List[Case]:
    """Per budget and thread count: eager dynenc, ONNX Runtime fp32 and int8 (always on the CPU)."""
    result = []
    for layers in budget_layers(config):
        for threads in THREADS:
            result.append(Case("edge", _name("dynenc", layers, threads), "dynenc", _eager(layers, threads)))
            for precision in PRECISIONS:
                result.append(Case("edge", _name(f"ort {precision}", layers, threads), f"onnxruntime-{precision}",
                                   _onnx_runtime(layers, threads, precision)))
    return result


def ratios(config: BenchConfig) -> List[Ratio]:
    """No targets: ONNX Runtime fp32 / eager dynenc and int8 / fp32, per budget and thread
    count; and each budget's fp32 time over full depth (compare with n / L)."""
    result = []
    full = max(budget_layers(config))
    for layers in budget_layers(config):
        for threads in THREADS:
            fp32, int8 = _key("ort fp32", layers, threads), _key("ort int8", layers, threads)
            result += [Ratio("edge", f"ort fp32 / dynenc n={layers} t={threads}", fp32,
                             _key("dynenc", layers, threads)),
                       Ratio("edge", f"ort int8 / fp32 n={layers} t={threads}", int8, fp32)]
            if layers != full:
                result.append(Ratio("edge", f"ort fp32 n={layers} / n={full} t={threads}", fp32,
                                    _key("ort fp32", full, threads)))
    return result


def plot(ax, rows) -> None:
    """Latency vs executed fraction, one line per (peer, threads)."""
    lines: Dict[Tuple[str, int], List[Tuple[float, float]]] = {}
    for row in rows:
        lines.setdefault((row.peer, row.info["threads"]), []).append((row.info["active"], row.median_ms))
    for (peer, threads), points in sorted(lines.items()):
        ax.plot(*zip(*sorted(points)), "o-" if threads == 1 else "s--", label=f"{peer}, {threads} thread(s)")
    ax.set(title="edge: one utterance, batch 1 (front-end included)", xlabel="executed fraction of the encoder",
           ylabel="ms", xlim=(0, 1.05))
    ax.legend(fontsize=7)


FIGURE = Figure("edge", cases, ratios, per_token=False)
