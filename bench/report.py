"""Output of a run: text tables, ``bench.json`` and one PNG per device."""
from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .figures import edge, foundation, latency
from .runner import RatioResult, Row
from .workload import BenchConfig


# ============================================================================ tables
def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]

    def line(cells: Sequence[str]) -> str:  # two label columns left-aligned, numbers right-aligned
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def _throughput(row: Row) -> str:
    """``"1,234 GB/s"``, ``"0.0123 TFLOP/s"`` (3 significant digits), or blank."""
    for rate, unit in ((row.gb_per_s, "GB/s"), (row.tflop_per_s, "TFLOP/s")):
        if rate is not None:
            return f"{rate:,.0f} {unit}" if rate >= 100 else f"{rate:.3g} {unit}"
    return ""


def format_rows(rows: Sequence[Row]) -> str:
    body = []
    for row in rows:
        info = row.info
        phases = " / ".join(f"{row.phases_ms[p]:.1f}" for p in ("fwd", "bwd") if p in row.phases_ms)
        median_ms = f"{row.median_ms:.3f}" if row.median_ms < 10 else f"{row.median_ms:.1f}"
        body.append([
            f"{row.device}:{row.figure}", row.case, median_ms, f"{row.tokens_per_s:,.0f}" if row.tokens_per_s else "",
            *(f"{info[key]:.2f}" if key in info else "" for key in ("active", "flops", "computed")),
            phases, f"{info['saved_mb']:.1f}" if "saved_mb" in info else "",
            f"{info['peak_mb']:.1f}" if "peak_mb" in info else "", _throughput(row),
            "" if row.peak_fraction is None else f"{row.peak_fraction:.1%}"])
    header = ["figure", "case", "median ms", "tokens/s", "active", "flops", "computed", "fwd / bwd ms", "saved MB",
              "peak MB", "throughput", "of peak"]
    return _table(header, body)


def format_results(results: Sequence[RatioResult]) -> str:
    def unit(r: RatioResult) -> str:
        return f" {r.unit}" if r.unit else ""

    body = [[f"{r.device}:{r.figure}", r.name, f"{r.measured:.3f}{unit(r)}",
             "" if r.target is None else f"<= {r.target:.2f}{unit(r)}",
             {True: "met", False: "MISSED", None: "-"}[r.met]] for r in results]
    return _table(["figure", "ratio", "measured", "target", ""], body)


def format_machine(machine: Dict[str, Any]) -> str:
    busy, gpu, peak = machine["cpu_busy_before"], machine["gpu"], machine["gpu_peak"]
    if gpu:  # which peaks the ops rows' fractions are of
        gpu += " (not in the peak table)" if peak is None else f" (peak table: {peak['name']})"
    return (f"CPU: {machine['cpu']} ({machine['cpu_count']} cores, torch threads {machine['torch_threads']}; "
            f"busy before the run {'?' if busy is None else f'{busy:.0%}'}, load {machine['load_avg_1m']})  "
            f"GPU: {gpu or 'none'}\n"
            f"torch {machine['torch']}  torchaudio {machine['torchaudio']}  triton {machine['triton']}  "
            f"dynenc {machine['dynenc']} ({machine['dynenc_commit']})  python {machine['python']}")


def format_sizes(config: BenchConfig) -> str:
    """One line: the model and workload sizes of the run."""
    model = config.model
    return (f"D={model.dim} L={model.num_layers} heads={model.num_heads} ffn={model.ffn_dim} "
            f"kernel={model.kernel_size} B={config.batch} T={config.frames} (lengths {config.min_length:.0%}..100%) "
            f"op D={config.op_dim}; median of {config.repeats} after {config.warmup} warm-up")


# ============================================================================ plots
PEER_COLOURS = {"torchaudio": "C3", "masked": "C1", "dynenc-reference": "C4", "dynenc": "C0", "eager": "C7",
                "huggingface": "C5"}


def _plot_proportionality(ax, forward: List[Row]) -> None:
    for peer, style in (("dynenc", "o-"), ("masked", "s--")):
        points = sorted((r.info["active"], r.median_ms) for r in forward
                        if r.peer == peer and "LD" not in r.case and "active" in r.info)
        if points:
            ax.plot(*zip(*points), style, color=PEER_COLOURS[peer], label=peer)
    for r in forward:
        if r.case == "dynenc f=1.00":
            ax.plot([0, 1], [0, r.median_ms], ":", color="gray", label="ideal (f x full)")
        if r.peer == "torchaudio":
            ax.axhline(r.median_ms, color=PEER_COLOURS["torchaudio"], label="torchaudio (static)")
    ax.set(title="forward time vs active fraction", xlabel="executed fraction of valid token x layers", ylabel="ms",
           xlim=(0, 1.05))
    ax.legend(fontsize=8)


def _plot_bars(ax, data: List[Row], title: str) -> None:
    """Median times; forward and backward stacked for training steps; saved MB noted."""
    labels = [r.case for r in data]
    if all("fwd" in r.phases_ms for r in data):
        fwd = [r.phases_ms["fwd"] for r in data]
        ax.barh(labels, fwd, label="forward")
        ax.barh(labels, [r.phases_ms["bwd"] for r in data], left=fwd, label="backward")
        ax.legend(fontsize=8)
    else:
        ax.barh(labels, [r.median_ms for r in data], color=[PEER_COLOURS.get(r.peer, "C7") for r in data])
    for i, r in enumerate(data):
        extra = f"  {r.info['saved_mb']:.0f} MB saved" if "saved_mb" in r.info else ""
        end = sum(r.phases_ms.values()) if r.phases_ms else r.median_ms
        ax.text(end, i, f" {r.median_ms:.0f} ms{extra}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set(title=title, xlabel="ms")
    ax.margins(x=0.35)


def _plot_exits(ax, exits: List[Row]) -> None:
    times = {r.case: r.median_ms for r in exits}
    full, front = times["full"], times.get("front-end only", 0.0)
    top = 1.0
    for r in exits:
        if "active" in r.info:
            ratio = r.median_ms / full
            top = max(top, ratio)
            ax.plot(r.info["active"], ratio, "o", color="C0")
            ax.annotate(f" {r.case}", (r.info["active"], ratio), fontsize=7)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="proportional")
    if front:
        ax.plot([0, 1], [front / full, 1], "--", color="gray", lw=0.8, label="front-end + proportional encoder")
    ax.legend(fontsize=8, loc="lower right")
    ax.set(title="inference budgets (CTC model, front-end included)", xlabel="executed fraction of the encoder",
           ylabel="time / full", xlim=(0, 1.1), ylim=(0, top * 1.1))


def _plot_ops(ax, op_results: List[RatioResult]) -> None:
    labels = [textwrap.fill(r.name, 34) for r in op_results]
    ax.barh(labels, [r.measured for r in op_results], color=["C2" if r.met is not False else "C3" for r in op_results])
    ax.axvline(1, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=6)
    for i, r in enumerate(op_results):
        ax.text(r.measured, i, f" {r.measured:.3g}", va="center", fontsize=7)
    ax.set(title="ops: native / eager time; routing overhead / layer", xlabel="time ratio (lower is better)")


def plot(rows: Sequence[Row], results: Sequence[RatioResult], device: str, path: Path, title: str) -> None:
    """One PNG per device: forward time vs active fraction, padding, training, DLD,
    inference budgets, op ratios, peers, roofline, edge latency, foundation models, batch-1
    latency per budget (panels of
    figures that did not run say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_figure: Dict[str, List[Row]] = {}
    for row in rows:
        if row.device == device:
            by_figure.setdefault(row.figure, []).append(row)
    op_results = [r for r in results if r.device == device and r.figure == "ops"]
    fig, axes = plt.subplots(4, 3, figsize=(17, 18.5))
    fig.suptitle(title, fontsize=9)
    panels = [
        ("forward", lambda ax: _plot_proportionality(ax, by_figure["forward"])),
        ("forward", lambda ax: _plot_bars(ax, by_figure["forward"], "forward (padded peers vs packed dynenc)")),
        ("train", lambda ax: _plot_bars(ax, by_figure["train"], "training step (fwd + bwd)")),
        ("dld", lambda ax: _plot_bars(ax, by_figure["dld"], "DLD step vs teacher fwd + full student step")),
        ("exits", lambda ax: _plot_exits(ax, by_figure["exits"])),
        ("ops", lambda ax: _plot_ops(ax, op_results)),
        ("peers", lambda ax: _plot_bars(ax, by_figure["peers"], "full depth vs the peers users pick")),
        ("roofline", lambda ax: _plot_bars(ax, by_figure["roofline"], "forward / train step vs their dense matmuls")),
        ("edge", lambda ax: edge.plot(ax, by_figure["edge"])),
        ("foundation", lambda ax: foundation.plot(ax, by_figure["foundation"])),
        ("latency", lambda ax: latency.plot(ax, by_figure["latency"])),
    ]
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (figure, draw) in zip(axes.flat, panels):
        if figure in by_figure:
            draw(ax)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{figure}: not run", ha="center", va="center", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ files
def write_outputs(out_dir: Path, config: BenchConfig, machine: Dict[str, Any], rows: Sequence[Row],
                  results: Sequence[RatioResult], devices: Sequence[str], wall_s: float,
                  figure_s: Optional[Dict[str, float]] = None) -> Dict[str, Path]:
    """``bench.json`` (machine, config, wall and per-figure seconds, rows, ratios) and
    ``bench_{device}.png``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json"}
    payload = {
        "machine": machine,
        "config": dataclasses.asdict(config),
        "devices": list(devices),
        "wall_s": wall_s,
        "figure_s": dict(figure_s or {}),  # "device:figure" -> seconds, setup (compiles, exports) included
        "notes": {
            "timing": "median over repeats after warm-up; cases of a figure timed round-robin; forward-only cases "
                      "under torch.inference_mode",
            "active": "fraction of the valid token x layers the outputs depend on",
            "flops": "estimated FLOPs executed over those of the full-depth packed forward",
            "computed": "token x layers computed over the valid token x layers (padding and discarded work > 1)",
            "saved_mb": "bytes of the distinct storages autograd saves for backward in one forward (parameters "
                        "excluded): the activation memory of a training step",
            "peak_mb": "foundation attention rows: the most memory one call allocates at once above what was "
                       "allocated before it (CPU: torch.profiler's allocation events; CUDA: the allocator's peak)",
            "tokens_per_s": "valid input frames per second",
            "work": "ops rows: the least work of one call (bytes read + written by a memory-bound op, FLOPs of "
                    "attention and the layer: packed, unpadded sequences), credited to every implementation alike",
            "gb_per_s": "ops rows: work bytes over the median (useful throughput of a memory-bound op)",
            "tflop_per_s": "ops rows: work FLOPs over the median (useful throughput of attention, the layer)",
            "peak_fraction": "that throughput over the GPU's datasheet peak (machine.gpu_peak: memory bandwidth, or "
                             "the dense TFLOP/s of the work's math mode); null on CPUs and GPUs not in the table",
        },
        "rows": [dataclasses.asdict(r) for r in rows],
        "ratios": [dataclasses.asdict(r) for r in results],
    }
    paths["json"].write_text(json.dumps(payload, indent=2))
    title = format_machine(machine)
    for device in devices:
        paths[f"png_{device}"] = out_dir / f"bench_{device}.png"
        plot(rows, results, device, paths[f"png_{device}"], title)
    return paths
