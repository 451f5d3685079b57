"""Running figures: prepare a figure's cases, time them together, turn medians into
:class:`Row` s and its ratios into :class:`RatioResult` s."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .figures import FIGURES, Ratio, all_cases, weighted_terms
from .harness import Work, gpu_peak, measure, median
from .workload import BenchConfig, Workload


@dataclass
class Row:
    device: str
    figure: str
    case: str
    peer: str
    median_ms: float
    times_ms: List[float]
    tokens_per_s: Optional[float]
    phases_ms: Dict[str, float]
    info: Dict[str, Any]
    # micro-benchmarks: the least work of one call, and the rate it was done at (GB/s for
    # memory-bound ops, TFLOP/s for compute-bound ones) over the device's peak (None if unknown)
    work: Optional[Work] = None
    gb_per_s: Optional[float] = None
    tflop_per_s: Optional[float] = None
    peak_fraction: Optional[float] = None


@dataclass
class RatioResult:
    device: str
    figure: str
    name: str
    measured: float
    target: Optional[float]
    met: Optional[bool]
    note: str
    unit: str = ""  # "ms" for absolute rows (metric "ms"), else "" (a ratio)


def evaluate(ratios: Sequence[Ratio], rows: Dict[str, Row], device: str) -> List[RatioResult]:
    """Medians (or saved / peak bytes) -> ratios against their targets (metric ``"ms"``: the
    numerator's weighted sum of medians itself, in ms); ratios over cases that were not run are
    left out."""
    results = []
    infos = {key: row.info for key, row in rows.items()}
    for ratio in ratios:
        numerator, denominator = weighted_terms(ratio.numerator), weighted_terms(ratio.denominator)
        if not all(key in rows for key, _ in numerator + denominator):
            continue

        info_key = {"saved": "saved_mb", "peak": "peak_mb"}.get(ratio.metric)  # None: the median time

        def value(terms: Tuple[Tuple[str, float], ...], info_key: Optional[str] = info_key) -> float:
            return sum(weight * (rows[key].info[info_key] if info_key else rows[key].median_ms)
                       for key, weight in terms)

        # "ms": an absolute time (a weighted sum of medians, e.g. a fit's coefficient), no denominator
        measured = value(numerator) if ratio.metric == "ms" else value(numerator) / value(denominator)
        target = ratio.target(infos) if callable(ratio.target) else ratio.target
        met = None if target is None else bool(measured <= target)
        results.append(RatioResult(device, ratio.figure, ratio.name, measured, target, met, ratio.note,
                                   unit="ms" if ratio.metric == "ms" else ""))
    return results


def run_figure(figure: str, config: BenchConfig, workload: Workload, progress=None) -> Dict[str, Row]:
    """Prepare and time every case of ``figure`` that runs on the workload's device; rows keyed
    by case key. ``progress``: a tqdm bar counting cases, advanced by fractions of a case per
    timed round."""
    spec = FIGURES[figure]
    cases = [case for case in spec.cases(config) if case.runs_on(workload.device)]
    prepared = {}
    for case in cases:
        if progress is not None:
            progress.set_postfix_str(f"{workload.device.type} {case.key} (setup)")
        prepared[case.key] = case.build(workload)
    rounds = config.warmup + config.repeats

    def on_round(key: str) -> None:
        if progress is not None:  # n counts cases: one timed round of a case is 1 / rounds of it
            progress.set_postfix_str(f"{workload.device.type} {key}", refresh=False)
            progress.n = (round(progress.n * rounds) + 1) / rounds  # recomputed: float sums would drift
            progress.refresh()

    # op_min_time only lengthens the micro-benchmarks (cases that repeat inside a measurement).
    timings = measure(prepared, config.repeats, config.warmup, workload.device, config.op_min_time, on_round)
    # no peak table for CPUs: their rows have no fraction of peak
    peak = gpu_peak(torch.cuda.get_device_name(workload.device)) if workload.device.type == "cuda" else None
    rows = {}
    for case in cases:
        timing = timings[case.key]
        seconds = timing.median
        work = prepared[case.key].work
        rows[case.key] = Row(
            device=workload.device.type, figure=figure, case=case.name, peer=case.peer, median_ms=seconds * 1e3,
            times_ms=[t * 1e3 for t in timing.seconds],
            tokens_per_s=workload.valid_tokens / seconds if spec.per_token and seconds > 0 else None,
            phases_ms={phase: median(values) * 1e3 for phase, values in timing.phases.items()},
            info=prepared[case.key].info, work=work, **(work.rates(seconds, peak) if work and seconds > 0 else {}))
    return rows


def run_benchmarks(config: BenchConfig, figures: Sequence[str], devices: Sequence[str],
                   show_progress: bool = True,
                   figure_seconds: Optional[Dict[str, float]] = None) -> Tuple[List[Row], List[RatioResult]]:
    """Every figure on every device; returns ``(rows, ratio results)``. ``figure_seconds``, if
    given, receives each figure's wall seconds (setup included) under ``"{device}:{figure}"``."""
    from tqdm.auto import tqdm

    total = sum(case.runs_on(torch.device(device)) for device in devices for case in all_cases(config, figures))
    rows: List[Row] = []
    results: List[RatioResult] = []
    # No tqdm monitor thread (it wakes every monitor_interval s to look for stalled bars; the bar is
    # refreshed per round anyway): a thread waking inside the timed loop is noise for the few-ms
    # latency cases on 2 cores (dynenc full, 2 s, 1 thread: 22.6 and 23.7 ms in 2 runs with it,
    # 15.1-15.4 ms in 4 runs without the bar or the monitor; the host's own noise is of that size too).
    monitor_interval, tqdm.monitor_interval = tqdm.monitor_interval, 0
    try:
        progress = tqdm(total=total, desc="dynenc bench", unit="case", disable=not show_progress,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total} cases [{elapsed}<{remaining}{postfix}]")
    finally:
        tqdm.monitor_interval = monitor_interval
    with progress:
        for device in devices:
            workload = Workload(config, torch.device(device))
            for figure in figures:
                start = time.perf_counter()
                figure_rows = run_figure(figure, config, workload, progress)
                if figure_seconds is not None:
                    figure_seconds[f"{device}:{figure}"] = time.perf_counter() - start
                rows.extend(figure_rows.values())
                results.extend(evaluate(FIGURES[figure].ratios(config), figure_rows, device))
    return rows, results
