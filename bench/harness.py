"""Timing and the machine header.

Cases of a figure are timed round-robin by a hand-written loop rather than
``torch.utils.benchmark.Timer.blocked_autorange``: the Timer measures one statement in its
own time window, so drift of a shared machine would enter the ratios between peers, and it
has no hook for a training step's forward / backward split. The loop keeps what the Timer
would add: CUDA synchronisation around each measurement and, for micro-benchmarks,
repeating the call until a measurement lasts ``min_time``.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import dynenc


# ============================================================================ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One training step (forward + backward of ``loss_fn()``) that remembers the seconds
    its forward and backward took (``last``), and can measure saved activations."""

    def __init__(self, loss_fn: Callable[[], Tensor], modules: Sequence[nn.Module], device: torch.device) -> None:
        self.loss_fn, self.modules, self.device = loss_fn, list(modules), device
        self.last: Dict[str, float] = {}

    def _prepare(self) -> None:
        for module in self.modules:
            module.train()
            module.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self._prepare()
        start = time.perf_counter()
        loss = self.loss_fn()
        synchronize(self.device)
        middle = time.perf_counter()
        loss.backward()
        synchronize(self.device)
        self.last = {"fwd": middle - start, "bwd": time.perf_counter() - middle}

    def saved_bytes(self) -> int:
        """Bytes of the distinct storages autograd saves for backward in one forward,
        parameters excluded: the activation memory a training step holds at its peak (on
        top of weights and gradients). Measured without a backward, outside the timings."""
        self._prepare()
        params = {p.untyped_storage().data_ptr() for m in self.modules for p in m.parameters()}
        storages: Dict[int, int] = {}

        def pack_hook(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            self.loss_fn()
        return sum(storages.values())


@dataclass
class Prepared:
    """A case ready to run: ``run()`` is what gets timed; ``info`` are per-case facts
    (``active`` and ``computed`` fractions of the valid token x layers, ``saved_mb``, ...)."""

    run: Callable[[], Any]
    info: Dict[str, Any] = field(default_factory=dict)
    repeat_inside: bool = False  # micro-benchmarks: repeat run() inside one measurement


@dataclass
class Timing:
    seconds: List[float] = field(default_factory=list)  # one per measured round (per call)
    phases: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return median(self.seconds)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _calls_per_measurement(prepared: Prepared, min_time: float, device: torch.device) -> int:
    """How often a micro-benchmark repeats inside one measurement to last ``min_time``."""
    if not prepared.repeat_inside or min_time <= 0:
        return 1
    synchronize(device)
    start = time.perf_counter()
    prepared.run()
    synchronize(device)
    return max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-7)))


def measure(prepared: Dict[str, Prepared], repeats: int, warmup: int, device: torch.device,
            min_time: float = 0.0, on_round: Optional[Callable[[str], None]] = None) -> Dict[str, Timing]:
    """Time every case ``warmup + repeats`` rounds, round-robin; keep the last ``repeats``.

    Cases with ``repeat_inside`` repeat their call to last ``min_time`` per measurement.
    ``on_round(name)`` is called after each timed call (progress reporting).
    """
    calls = {name: _calls_per_measurement(p, min_time, device) for name, p in prepared.items()}
    timings = {name: Timing() for name in prepared}
    for round_id in range(warmup + repeats):
        for name, case in prepared.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                case.run()
            synchronize(device)
            elapsed = (time.perf_counter() - start) / calls[name]
            if round_id >= warmup:
                timings[name].seconds.append(elapsed)
                # Training steps (TrainStep) also report their forward / backward split.
                for phase, seconds in getattr(case.run, "last", {}).items():
                    timings[name].phases.setdefault(phase, []).append(seconds)
            if on_round is not None:
                on_round(name)
    return timings


# ============================================================================ machine header
def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_busy(seconds: float = 0.5) -> Optional[float]:
    """Fraction of all CPUs' time spent busy over ``seconds`` (Linux ``/proc/stat``).

    Sampled while this process is idle, it measures the other processes: unlike the load
    average it does not lag behind by a minute."""

    def sample() -> Tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((busy1 - busy0) / max(total1 - total0, 1), 3)


def machine_info() -> Dict[str, Any]:
    """CPU model and threads, GPU if any, library versions, dynenc commit."""
    import torchaudio

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpu_busy_before": _cpu_busy(),
        "load_avg_1m": load_average(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "triton": triton_version,
        "dynenc": dynenc.__version__,
        "dynenc_commit": _git_commit(),
    }
