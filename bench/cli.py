"""``dynenc bench``: the command line (``add_arguments(parser)``, ``run(args)``).

Model sizes are :class:`dynenc.asr.ModelConfig` fields under their own names
(``--dim --num-heads --ffn-dim --num-layers --kernel-size``); the flags' names from before
(``--heads --layers --kernel``) remain as aliases. ``dynenc profile`` takes the same flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from dynenc.validation import check_device
from .figures import FIGURES
from .harness import load_average, machine_info
from .report import format_machine, format_results, format_rows, format_sizes, write_outputs
from .runner import run_benchmarks
from .workload import FULL, QUICK, BenchConfig

MODEL_SIZES = ("dim", "num_heads", "ffn_dim", "num_layers", "kernel_size")
RUN_SIZES = ("batch", "frames", "op_dim", "repeats", "warmup")
_ALIASES = {"num_heads": ("--heads",), "num_layers": ("--layers",), "kernel_size": ("--kernel",)}


def size_of(config: BenchConfig, name: str) -> int:
    """The size ``name`` (a ModelConfig field in MODEL_SIZES, else a BenchConfig field)."""
    return getattr(config.model if name in MODEL_SIZES else config, name)


def add_size_arguments(group, names: Sequence[str], describe: Callable[[str], str]) -> None:
    """One int flag per size in ``names``; ``None`` (the default) keeps the base config's."""
    for name in names:
        group.add_argument(f"--{name.replace('_', '-')}", *_ALIASES.get(name, ()), dest=name, type=int,
                           default=None, help=describe(name))


def with_sizes(base: BenchConfig, args: argparse.Namespace, names: Sequence[str]) -> BenchConfig:
    """``base`` with the sizes in ``names`` that ``args`` sets (ModelConfig validates the model's)."""
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    model = dataclasses.replace(base.model, **{k: v for k, v in given.items() if k in MODEL_SIZES})
    return dataclasses.replace(base, model=model, **{k: v for k, v in given.items() if k not in MODEL_SIZES})


#: Wall time of the default and the full run (``/usr/bin/time``, cold torch.compile cache) on this
#: project's 2-core AMD EPYC machine, no GPU, otherwise idle: 110 s and 269 s before the
#: ``foundation`` figure. Measured, not estimated. Slower hosts of the same kind, or other jobs on
#: the cores, took 2-3x as long. ``foundation`` adds 97 s to the default run (measured alone,
#: ``--modes foundation``); to the full run about 20 minutes (estimated: one cold round of its
#: 2-16 s cases took 120 s, and the full run times ten rounds). ``latency`` adds 49 s to the default
#: run (measured alone, ``/usr/bin/time dynenc bench --modes latency``: four ONNX exports, then the
#: timing); to the full run about 1.5 minutes (estimated: the same exports, nine rounds).
DEFAULT_DURATION, FULL_DURATION = "~4 minutes", "~27 minutes"


def _size_help(name: str) -> str:
    default, full, quick = (size_of(config, name) for config in (BenchConfig(), FULL, QUICK))
    others = ([f"full {full}"] if full != default else []) + [f"quick {quick}"]
    return f"default {default} ({', '.join(others)})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    sizes = parser.add_argument_group(f"sizes (defaults: the default run, {DEFAULT_DURATION} on 2 idle CPU cores; "
                                      "--quick: tiny)")
    add_size_arguments(sizes, MODEL_SIZES + RUN_SIZES, _size_help)
    sizes.add_argument("--fractions", type=float, nargs="+", default=None,
                       help=f"active fractions for proportionality (default {' '.join(map(str, defaults.fractions))})")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--full", action="store_true",
                       help=f"the complete set: every case and sweep point of every figure (the masked peer at "
                            f"every fraction, dynenc compiled, every early exit and blank-skip budget, an edge "
                            f"budget per fraction), median of {FULL.repeats} rounds; {FULL_DURATION} on 2 idle "
                            f"CPU cores (default: the headline cases at the same sizes, median of "
                            f"{defaults.repeats}, {DEFAULT_DURATION})")
    scope.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every case in seconds")
    parser.add_argument("--modes", nargs="+", choices=list(FIGURES), default=list(FIGURES), metavar="MODE",
                        help=f"figures to run (default all: {' '.join(FIGURES)})")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices (default: cpu, plus cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="output directory (default out/bench)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = QUICK if args.quick else FULL if args.full else BenchConfig()
    config = with_sizes(base, args, MODEL_SIZES + RUN_SIZES)
    if args.fractions is not None:
        config = dataclasses.replace(config, fractions=tuple(sorted(set(args.fractions) | {1.0}, reverse=True)))
    return config


def _devices(requested: Optional[Sequence[str]]) -> List[str]:
    if requested is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in requested:
        check_device("--devices", device)
    return list(requested)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    devices = _devices(args.devices)
    figures = [f for f in FIGURES if f in args.modes]
    machine = machine_info()
    print(format_machine(machine), flush=True)
    busy = machine["cpu_busy_before"]
    if busy is not None and busy > 0.2:  # others take cores from the worker threads, which then wait on each other
        print(f"warning: other processes kept the CPUs {busy:.0%} busy before the run: timings will be noisy",
              flush=True)
    start = time.perf_counter()
    figure_s: Dict[str, float] = {}
    rows, results = run_benchmarks(config, figures, devices, show_progress=not args.no_progress,
                                   figure_seconds=figure_s)
    wall_s = time.perf_counter() - start
    machine["load_avg_1m_after"] = load_average()  # includes this run's own threads
    paths = write_outputs(args.out, config, machine, rows, results, devices, wall_s, figure_s)
    print()
    print(format_sizes(config))
    print(format_rows(rows))
    print()
    print(format_results(results))
    per_figure = ", ".join(f"{key} {seconds:.0f}" for key, seconds in figure_s.items())
    print(f"\nwall time {wall_s:.1f} s ({per_figure}); wrote {', '.join(str(p) for p in paths.values())}")
    return 0
