"""``latency``: batch-1 latency of every budget kind as a user calls it, against ONNX Runtime on
the exported graph of the same fixed budget, and the fixed cost per call and per layer.

One utterance at a time (batch 1), on 1 and 2 intra-op threads, at 2 s and 8 s of audio (fbank
frames 200 / 800: :data:`FRAMES`), front-end included. Model: a random-weight CTC model at the
bench config (D=144, 8 layers) with early-exit heads at depths 2 / 4 / 6, a blank-skip head at
depth 3 and a selector of 64 hidden units (:func:`model_config`); always on the CPU.

Cases (``{peer} {budget} {seconds} t={threads}``):

* ``dynenc``: :func:`dynenc.methods.infer` under inference mode, one call per budget —
  ``full`` (:class:`~dynenc.methods.FullBudget`), ``n=6/4/2/1`` (``LayerDropBudget(layers=n)``),
  ``selector k=4`` (``SelectorBudget(k=L/2)``), ``exit τ`` (``EarlyExitBudget(threshold=τ)``,
  τ set so that the utterance exits near L/2: random weights, the scores mean nothing; the
  executed depth is in the row's info) and ``blank skip τ`` (``BlankSkipBudget(threshold=τ)``,
  τ the quantile of the utterance's p(blank) at depth K that skips :data:`SKIPPED` of the frames);
* ``ort fp32`` / ``ort int8``: ONNX Runtime on :func:`dynenc.export.fixed_budget_graph` of
  ``LayerDropBudget(layers=n)`` (n = L is the full graph), fp32 and dynamic-int8 linears
  (:func:`dynenc.export.quantize_int8`); one export per n serves both lengths and thread counts;
* ``matmuls``: the 8 ``F.linear`` calls of one layer (:func:`.roofline._linears`, layer 0's
  weights) on random rows of the utterance's encoder length: the layer's irreducible GEMM time.

Ratios (per length and thread count): dynenc / ORT fp32 for every budget with a static graph
(target <= 1.0) and dynenc / ORT int8 (no target). The selector's k layers are compared with
ORT's n = k graph (every other layer: the same work; ORT runs no selector). Threshold exit and
blank skip have no static graph: only dynenc's time is reported. Absolute rows (metric ``"ms"``):
the least-squares fit time(n) = a + b * n over dynenc's n-layer budgets (n = 1, 2, 4, 6 and full
depth) — ``a`` the fixed ms per call (target <= 3 ms), ``b`` the ms per layer, and b minus the
layer's matmuls, the fixed per-layer cost (target <= 0.5 ms at 2 threads).

Every case repeats its call inside a measurement (``op_min_time``): single calls of a few ms
are too noisy for the fit. Setup exports four graphs (n = L, 3L/4, L/2, L/4; ~6 s each on 2
cores), in the default run too: ``--full`` only times more rounds. No torchaudio peer: ``edge``
does not build one."""
from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from dynenc import export
from dynenc.asr import CTCModel, ModelConfig
from dynenc.methods import BlankSkipBudget, Budget, EarlyExitBudget, FullBudget, LayerDropBudget, SelectorBudget, infer

from ..harness import Prepared
from ..workload import QUICK, BenchConfig, Workload
from .base import Case, Figure, Ratio, Terms, quiet_loggers, under_inference, without_root_warning
from .edge import _on_threads
from .roofline import _linears

FIGURE_NAME = "latency"
#: Feature frames (10 ms each) of the utterances: 2 s and 8 s.
FRAMES = (200, 800)
QUICK_FRAMES = (40, 80)
THREADS = (1, 2)
PRECISIONS = ("fp32", "int8")
#: Fraction of the frames the blank-skip budget skips after depth K.
SKIPPED = 0.6
#: Targets: dynenc / ORT fp32, fixed ms per call, fixed ms per layer (at 2 threads).
RATIO_TARGET, CALL_TARGET_MS, LAYER_TARGET_MS = 1.0, 3.0, 0.5


# ============================================================================ sizes
def tiny(config: BenchConfig) -> bool:
    return config.model == QUICK.model


def frames(config: BenchConfig) -> Tuple[int, ...]:
    return QUICK_FRAMES if tiny(config) else FRAMES


def seconds_label(frame_count: int) -> str:
    return f"{frame_count / 100:g}s"


def model_config(config: BenchConfig) -> ModelConfig:
    """The bench model with exit heads at L/4, L/2, 3L/4, a blank-skip head at 3L/8 and a
    selector (at L = 8: exits 2 / 4 / 6, blank skip 3)."""
    layers = config.model.num_layers
    exits = tuple(sorted({max(1, layers * q // 4) for q in (1, 2, 3)} - {layers}))
    return dataclasses.replace(config.model, dropout=0.0, exit_depths=exits,
                               blank_skip_depth=max(1, round(3 * layers / 8)), selector_hidden=64)


def fit_layers(config: BenchConfig) -> List[int]:
    """The n of the n-layer budgets the fit runs over (deepest first; n = L is ``full``)."""
    layers = config.model.num_layers
    return sorted({max(1, round(layers * q / 8)) for q in (8, 6, 4, 2)} | {1}, reverse=True)


def onnx_layers(config: BenchConfig) -> List[int]:
    """The n exported for ONNX Runtime: L, 3L/4, L/2, L/4 (at the smoke sizes L and L/2). The
    default run has them all: every dynenc / ORT fp32 ratio has a target."""
    layers = config.model.num_layers
    quarters = (4, 2) if tiny(config) else (4, 3, 2, 1)
    return sorted({max(1, round(layers * q / 4)) for q in quarters}, reverse=True)


def budgets(config: BenchConfig) -> Dict[str, int]:
    """dynenc's budget names -> the n of the ORT graph they are compared with (0: none)."""
    layers = config.model.num_layers
    result = {"full": layers}
    result.update({f"n={n}": n for n in fit_layers(config) if n != layers})
    result[f"selector k={max(1, layers // 2)}"] = max(1, layers // 2)
    result["exit τ"] = 0
    result["blank skip τ"] = 0
    return result


# ============================================================================ model and inputs
@functools.cache
def _model(w: Workload) -> CTCModel:
    """The figure's model (on the CPU, also in a CUDA run), one per workload."""
    torch.manual_seed(w.config.seed)
    return CTCModel(model_config(w.config)).eval()


def _utterance(config: BenchConfig, frame_count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random fbank features ``[1, frames, F]`` and lengths ``[1]``."""
    generator = torch.Generator().manual_seed(config.seed + frame_count)
    features = torch.randn(1, frame_count, config.model.num_features, generator=generator)
    return features, torch.tensor([frame_count])


def _exit_threshold(model: CTCModel, features: torch.Tensor, lengths: torch.Tensor) -> float:
    """The largest τ on a grid at which the utterance exits nearest L/2."""
    target = model.config.num_layers / 2
    best: Tuple[float, float] = (float("inf"), 0.0)
    with torch.inference_mode():
        for tau in torch.logspace(-3, 0, 31).tolist():
            depth = int(infer(model, features, lengths, EarlyExitBudget(threshold=tau)).decisions.exit_depth[0])
            best = min(best, (abs(depth - target), -tau))
    return -best[1]


def _blank_threshold(model: CTCModel, features: torch.Tensor, lengths: torch.Tensor) -> float:
    """τ such that :data:`SKIPPED` of the utterance's frames have p(blank) > τ at depth K."""
    with torch.inference_mode():
        x, x_lengths = model.embed(features, lengths)
        out = model.encoder(x, x_lengths, return_hidden=True)
        p_blank = model.blank_head.blank_log_prob(out.hidden[model.config.blank_skip_depth - 1]).exp()
    return float(torch.quantile(p_blank.float().flatten(), 1 - SKIPPED))


@functools.cache
def _budget(w: Workload, name: str, frame_count: int) -> Budget:
    config = w.config
    model, layers = _model(w), config.model.num_layers
    if name == "full":
        return FullBudget()
    if name.startswith("n="):
        return LayerDropBudget(layers=int(name[2:]))
    if name.startswith("selector k="):
        return SelectorBudget(k=int(name.split("=")[1]))
    features, lengths = _utterance(config, frame_count)
    if name == "exit τ":
        return EarlyExitBudget(threshold=_exit_threshold(model, features, lengths))
    if name == "blank skip τ":
        return BlankSkipBudget(threshold=_blank_threshold(model, features, lengths))
    raise ValueError(f"unknown budget {name!r} (L={layers})")


@functools.cache
def _onnx_files(w: Workload, layers: int) -> Dict[str, Path]:
    """The n-layer budget's fp32 ONNX graph and its int8 copy (see ``edge``'s, same warnings kept
    out: torch.onnx's torchvision registry note, the quantizer's pre-processing advice)."""
    fp32 = Path(_scratch().name) / f"{id(w)}_n{layers}.onnx"
    with quiet_loggers("torch.onnx._internal.exporter._registration"):
        export.save(export.fixed_budget_graph(_model(w), LayerDropBudget(layers)), fp32)
    with without_root_warning("Please consider to run pre-processing before quantization"):
        int8 = export.quantize_int8(fp32, fp32.with_suffix(".int8.onnx"))
    return {"fp32": fp32, "int8": int8}


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dynenc_latency_")


# ============================================================================ cases
def _name(peer: str, budget: str, frame_count: int, threads: int) -> str:
    return f"{peer} {budget} {seconds_label(frame_count)} t={threads}"


def _key(peer: str, budget: str, frame_count: int, threads: int) -> str:
    return f"{FIGURE_NAME}/{_name(peer, budget, frame_count, threads)}"


def _dynenc(name: str, frame_count: int, threads: int) -> Callable[[Workload], Prepared]:
    def build(w: Workload) -> Prepared:
        config = w.config
        model, budget = _model(w), _budget(w, name, frame_count)
        features, lengths = _utterance(config, frame_count)
        # eval once, here, not per call (under_inference's modules): model.eval() walks every
        # submodule, ~0.6 ms at this size, which is no part of a user's call
        model.eval()
        run = _on_threads(threads, under_inference(lambda: infer(model, features, lengths, budget)))
        result = run()
        info: Dict[str, Any] = dict(active=result.report.executed_fraction, threads=threads,
                                    frames=int(result.lengths[0]))
        if result.decisions.exit_depth is not None:
            info["exit_depth"] = int(result.decisions.exit_depth[0])
        if result.decisions.skipped_frames is not None:
            info["skipped"] = float(result.decisions.skipped_frames.float().mean())
        return Prepared(run, info, repeat_inside=True)

    return build


def _onnx_runtime(layers: int, frame_count: int, threads: int, precision: str) -> Callable[[Workload], Prepared]:
    def build(w: Workload) -> Prepared:
        config = w.config
        features, lengths = _utterance(config, frame_count)
        session = export.onnx_session(_onnx_files(w, layers)[precision], threads)
        log_probs = export.run_onnx(session, features, lengths)[0]
        with torch.inference_mode():
            eager = infer(_model(w), features, lengths, LayerDropBudget(layers)).log_probs
        difference = float((torch.from_numpy(log_probs) - eager).abs().max())
        return Prepared(lambda: export.run_onnx(session, features, lengths),
                        dict(active=layers / config.model.num_layers, threads=threads, max_abs_diff=difference),
                        repeat_inside=True)

    return build


def _matmuls(frame_count: int, threads: int) -> Callable[[Workload], Prepared]:
    def build(w: Workload) -> Prepared:
        config = w.config
        model = _model(w)
        features, lengths = _utterance(config, frame_count)
        with torch.inference_mode():
            rows = int(model.embed(features, lengths)[1][0])
        linears = _linears(model.encoder.conformer_layers[0])
        generator = torch.Generator().manual_seed(config.seed + 7)
        inputs = {d: torch.randn(rows, d, generator=generator) for d in {weight.shape[1] for weight, _ in linears}}

        def call() -> Any:
            return [F.linear(inputs[weight.shape[1]], weight, bias) for weight, bias in linears]

        flops = 2 * rows * sum(weight.numel() for weight, _ in linears)
        return Prepared(_on_threads(threads, under_inference(call)),
                        dict(threads=threads, rows=rows, flops_per_call=flops), repeat_inside=True)

    return build


def cases(config: BenchConfig) -> List[Case]:
    result = []
    for frame_count in frames(config):
        for t in THREADS:
            for name in budgets(config):
                result.append(Case(FIGURE_NAME, _name("dynenc", name, frame_count, t), "dynenc",
                                   _dynenc(name, frame_count, t)))
            for n in onnx_layers(config):
                for precision in PRECISIONS:
                    result.append(Case(FIGURE_NAME, _name(f"ort {precision}", f"n={n}", frame_count, t),
                                       f"onnxruntime-{precision}", _onnx_runtime(n, frame_count, t, precision)))
            result.append(Case(FIGURE_NAME, _name("matmuls", "1 layer", frame_count, t), "eager",
                               _matmuls(frame_count, t)))
    return result


# ============================================================================ ratios
def least_squares(xs: Sequence[float]) -> Tuple[List[float], List[float]]:
    """Weights ``(w_a, w_b)`` with ``a = sum(w_a * y)`` and ``b = sum(w_b * y)`` the least-squares
    fit ``y = a + b * x`` over the points ``xs`` (linear in the y's, so a fit of medians is a
    weighted sum of medians)."""
    mean = sum(xs) / len(xs)
    spread = sum((x - mean) ** 2 for x in xs)
    slope = [(x - mean) / spread for x in xs]
    return [1 / len(xs) - mean * s for s in slope], slope


def fit_terms(config: BenchConfig, frame_count: int, t: int) -> Tuple[Terms, Terms]:
    """The weighted dynenc cases whose sums are ``a`` and ``b`` of the fit."""
    layers = config.model.num_layers
    ns = fit_layers(config)
    keys = [_key("dynenc", "full" if n == layers else f"n={n}", frame_count, t) for n in ns]
    w_a, w_b = least_squares(ns)
    return tuple(zip(keys, w_a)), tuple(zip(keys, w_b))


def ratios(config: BenchConfig) -> List[Ratio]:
    result = []
    exported = set(onnx_layers(config))
    for frame_count in frames(config):
        for t in THREADS:
            label = f"{seconds_label(frame_count)} t={t}"
            group = f"{FIGURE_NAME} {label}"
            for name, n in budgets(config).items():
                if n not in exported:
                    continue
                dyn = _key("dynenc", name, frame_count, t)
                note = "ORT: every other layer, the same work" if name.startswith("selector") else ""
                result += [Ratio(group, f"dynenc {name} / ort fp32 n={n}", dyn,
                                 _key("ort fp32", f"n={n}", frame_count, t), target=RATIO_TARGET, note=note),
                           Ratio(group, f"dynenc {name} / ort int8 n={n}", dyn,
                                 _key("ort int8", f"n={n}", frame_count, t), note=note)]
            a, b = fit_terms(config, frame_count, t)
            matmuls = _key("matmuls", "1 layer", frame_count, t)
            result += [
                Ratio(group, "fixed ms / call (a of a + b*n)", a, (), target=CALL_TARGET_MS, metric="ms"),
                Ratio(group, "ms / layer (b)", b, (), metric="ms"),
                Ratio(group, "fixed ms / layer (b - matmuls)", b + ((matmuls, -1.0),), (),
                      target=LAYER_TARGET_MS if t == 2 else None, metric="ms"),
            ]
    return result


def plot(ax, rows) -> None:
    """Median ms per budget at the shortest utterance, 1 thread: dynenc and ORT fp32 / int8."""
    shortest = min((r.case.split()[-2] for r in rows), key=lambda s: float(s[:-1]))
    chosen = [r for r in rows if r.case.endswith(f"{shortest} t=1") and not r.case.startswith("matmuls")]
    ax.barh([r.case.rsplit(" ", 2)[0] for r in chosen], [r.median_ms for r in chosen],
            color=[{"dynenc": "C0", "onnxruntime-fp32": "C2", "onnxruntime-int8": "C8"}.get(r.peer, "C7")
                   for r in chosen])
    for i, r in enumerate(chosen):
        ax.text(r.median_ms, i, f" {r.median_ms:.1f}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=6)
    ax.set(title=f"latency: batch 1, {shortest} utterance, 1 thread", xlabel="ms")
    ax.margins(x=0.2)


FIGURE = Figure(FIGURE_NAME, cases, ratios, per_token=False)
