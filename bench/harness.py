"""Timing, the work model of micro-benchmarks with the GPUs' datasheet peaks, and the machine
header.

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
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class Work:
    """The least work one call of a micro-benchmark must do, for its throughput: ``bytes`` read
    + written (memory-bound ops) or ``flops`` (compute-bound ones, held against the peak of the
    ``math`` mode, a key of :attr:`DevicePeak.tflops`). Every implementation of an op is
    credited with the same work, so the rows compare useful throughput."""

    bytes: Optional[int] = None
    flops: Optional[float] = None
    math: Optional[str] = None

    def rates(self, seconds: float, peak: Optional[DevicePeak]) -> Dict[str, Optional[float]]:
        """``gb_per_s`` or ``tflop_per_s`` (the other None) of this work done in ``seconds``,
        and ``peak_fraction``: that rate over the device's peak (None without a known peak)."""
        if self.flops is not None:
            rate = self.flops / seconds / 1e12
            ceiling = peak.tflops.get(self.math) if peak is not None else None
            return dict(gb_per_s=None, tflop_per_s=rate, peak_fraction=rate / ceiling if ceiling else None)
        rate = self.bytes / seconds / 1e9
        return dict(gb_per_s=rate, tflop_per_s=None, peak_fraction=rate / peak.gb_per_s if peak is not None else None)


@dataclass
class Prepared:
    """A case ready to run: ``run()`` is what gets timed; ``info`` are per-case facts
    (``active`` and ``computed`` fractions of the valid token x layers, ``saved_mb``, ...)."""

    run: Callable[[], Any]
    info: Dict[str, Any] = field(default_factory=dict)
    repeat_inside: bool = False  # micro-benchmarks: repeat run() inside one measurement
    work: Optional[Work] = None  # micro-benchmarks: the least work of one call (throughput rows)


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


# ============================================================================ device peaks
@dataclass(frozen=True)
class DevicePeak:
    """Datasheet peaks of a GPU: memory bandwidth (GB/s) and dense TFLOP/s per math mode —
    ``fp32`` on the CUDA cores, ``tf32``, ``bf16``, ``fp16`` on the tensor cores (no sparsity)."""

    name: str
    gb_per_s: float
    tflops: Dict[str, float]


def _gpu(name: str, gb_per_s: float, fp32: float, tf32: float, half: float) -> DevicePeak:
    return DevicePeak(name, gb_per_s, dict(fp32=fp32, tf32=tf32, bf16=half, fp16=half))  # bf16 = fp16 on all of them


#: Name tokens of ``torch.cuda.get_device_name()`` -> peaks. Sources: NVIDIA's datasheets ("H100
#: Tensor Core GPU", "H200 Tensor Core GPU", "A100 Tensor Core GPU", "L4 Tensor Core GPU", "A10
#: Tensor Core GPU", "L40S GPU"); where a datasheet gives tensor-core figures only with sparsity
#: (H100, H200, L4) the dense ones are half of them. A100 PCIe parts list the SXM compute figures.
GPU_PEAKS: Dict[Tuple[str, ...], DevicePeak] = {
    ("H100", "HBM3"): _gpu("H100 SXM", 3350, 67, 494.5, 989.5),  # "NVIDIA H100 80GB HBM3"
    ("H100", "PCIE"): _gpu("H100 PCIe", 2000, 51, 378, 756.5),
    ("H100", "NVL"): _gpu("H100 NVL", 3900, 60, 417.5, 835.5),
    ("H200",): _gpu("H200 SXM", 4800, 67, 494.5, 989.5),
    ("H200", "NVL"): _gpu("H200 NVL", 4800, 60, 417.5, 835.5),
    ("A100", "SXM4", "40GB"): _gpu("A100 SXM 40GB", 1555, 19.5, 156, 312),
    ("A100", "SXM4", "80GB"): _gpu("A100 SXM 80GB", 2039, 19.5, 156, 312),
    ("A100", "PCIE", "40GB"): _gpu("A100 PCIe 40GB", 1555, 19.5, 156, 312),
    ("A100", "PCIE", "80GB"): _gpu("A100 PCIe 80GB", 1935, 19.5, 156, 312),
    ("L4",): _gpu("L4", 300, 30.3, 60, 121),
    ("A10",): _gpu("A10", 600, 31.2, 62.5, 125),
    ("L40S",): _gpu("L40S", 864, 91.6, 183, 362.05),
}


def gpu_peak(device_name: Optional[str]) -> Optional[DevicePeak]:
    """The :data:`GPU_PEAKS` entry of a device name, or None (unknown devices are not guessed).

    Matched on whole tokens (``"A10"`` is not ``"A100"``, ``"L4"`` not ``"L40S"``); of the
    entries whose tokens all occur in the name, the one with the most tokens wins
    (``"NVIDIA H200 NVL"`` -> H200 NVL, ``"NVIDIA H200"`` -> H200 SXM)."""
    tokens = set(re.findall(r"[A-Z0-9]+", (device_name or "").upper()))
    matches = [key for key in GPU_PEAKS if tokens.issuperset(key)]
    return GPU_PEAKS[max(matches, key=len)] if matches else None


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
    """CPU model and threads, GPU if any (and its :data:`GPU_PEAKS` entry), library versions,
    dynenc commit."""
    import torchaudio

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = gpu_peak(gpu)
    return {
        "cpu_busy_before": _cpu_busy(),
        "load_avg_1m": load_average(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "gpu_peak": None if peak is None else asdict(peak),  # what the ops rows' fractions of peak are of
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "triton": triton_version,
        "dynenc": dynenc.__version__,
        "dynenc_commit": _git_commit(),
    }
