"""``dynenc profile``: one forward (and optionally backward) of a DynamicConformer with
per-sample layer-drop masks under ``torch.profiler``.

Prints the top ops (``key_averages``) and the dynenc entries — the ``dynenc::`` ops by name
and the ``dynenc.plan`` / ``dynenc.layer{i}`` / ... ``record_function`` ranges — and writes a
Chrome trace (open it in ``chrome://tracing`` or https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

import dynenc

from .bench.cli import MODEL_SIZES, add_size_arguments, size_of, with_sizes
from .bench.workload import BenchConfig, build_conformer, layer_drop_mask, make_input, valid_mean_square
from .validation import check_device

#: The bench workload's sizes this command takes (same flags as ``dynenc bench``).
SIZES = MODEL_SIZES + ("batch", "frames")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    add_size_arguments(parser, SIZES, lambda name: f"default {size_of(defaults, name)}")
    parser.add_argument(
        "--keep",
        type=float,
        default=0.5,
        help="fraction of layers each sample keeps (its own random subset); default 0.5",
    )
    parser.add_argument("--backward", action="store_true", help="profile forward + backward (training mode)")
    parser.add_argument("--backend", choices=("native", "reference"), default="native", help="dynenc op backend")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device (default: cuda when available, else cpu)",
    )
    parser.add_argument("--row-limit", type=int, default=25, help="rows of the top-ops table (default 25)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/profile/trace.json"),
        help="Chrome trace path (default out/profile/trace.json)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, inputs and masks (default 0)")


def dynenc_entries(events, sort_key: str) -> list:
    """The profiler averages of dynenc ops (``dynenc::*``) and ranges (``dynenc.*``)."""
    return sorted(
        (e for e in events if e.key.startswith(("dynenc::", "dynenc."))),
        key=lambda e: getattr(e, sort_key),
        reverse=True,
    )


def format_entries(entries: Sequence, device_time: bool) -> str:
    header = f"{'name':<44} {'calls':>6} {'self CPU ms':>12} {'CPU total ms':>13}"
    header += f" {'device total ms':>16}" if device_time else ""
    lines = [header, "-" * len(header)]
    for e in entries:
        line = f"{e.key:<44} {e.count:>6} {e.self_cpu_time_total / 1e3:>12.3f} {e.cpu_time_total / 1e3:>13.3f}"
        if device_time:
            line += f" {e.device_time_total / 1e3:>16.3f}"
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.keep <= 1:
        raise ValueError(f"--keep must lie in [0, 1], got {args.keep}")
    device = check_device("--device", args.device)
    config = with_sizes(BenchConfig(seed=args.seed), args, SIZES)
    _, model = build_conformer(config, device)
    x, lengths = make_input(config, device)
    generator = torch.Generator().manual_seed(args.seed)
    mask = layer_drop_mask(config.batch, config.model.num_layers, args.keep, generator).to(device)
    model.train(args.backward)

    def step() -> None:
        with torch.set_grad_enabled(args.backward), dynenc.use_backend(args.backend):
            output, _ = model(x, lengths, layer_mask=mask)
            if args.backward:
                model.zero_grad(set_to_none=True)
                valid_mean_square(output, lengths).backward()

    step()  # warm-up: first-call costs (thread pools, allocator, Triton compilation) stay out
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out))

    on_device = device.type == "cuda"
    sort_key = "device_time_total" if on_device else "self_cpu_time_total"
    events = prof.key_averages()
    mode = "forward + backward" if args.backward else "forward"
    model_config = config.model
    print(
        f"dynenc profile: {mode}, backend {args.backend}, {device}; D={model_config.dim} "
        f"L={model_config.num_layers} B={config.batch} T={config.frames}, each sample keeps {args.keep:.0%} of the "
        f"layers ({int(mask.sum())} of {mask.numel()} (sample, layer) pairs)"
    )
    print(events.table(sort_by=sort_key, row_limit=args.row_limit))
    print("dynenc ops and ranges:")
    print(format_entries(dynenc_entries(events, "device_time_total" if on_device else "cpu_time_total"), on_device))
    print(f"\nChrome trace: {args.out}")
    return 0
