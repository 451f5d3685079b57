"""``dynenc export``: the command line (``add_arguments(parser)``, ``run(args)``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..asr import load_checkpoint
from ..methods import (
    Budget,
    EarlyExitBudget,
    FullBudget,
    LayerDropBudget,
    SelectorBudget,
)
from .formats import FORMATS, MAX_FRAMES, MIN_FRAMES, ExportGraph, quantize_int8, save
from .graphs import GRAPH_CRITERIA, EarlyExitGraph, fixed_budget_graph


# ============================================================================ CLI
def _budget_from_args(args: argparse.Namespace) -> Optional[Budget]:
    """The budget the flags name (None for ``--layers`` or ``--early-exit``)."""
    if args.n_layers is not None:
        return LayerDropBudget(args.n_layers, args.strategy)
    if args.exit_depth is not None:
        return EarlyExitBudget(fixed_exit=args.exit_depth)
    if args.selector_k is not None:
        return SelectorBudget(k=args.selector_k)
    return None if args.layers is not None or args.early_exit else FullBudget()


def _utterance(path: Optional[Path], kind: str) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """What the model reads of an audio file — fbank features ``[1, T, 80]``, or with ``kind``
    ``"waveform"`` the 16 kHz samples ``[1, S, 1]`` — and lengths ``[1]`` (None without one)."""
    if path is None:
        return None, None
    from ..asr.features import SAMPLE_RATE, compute_fbank, read_audio, resample

    audio, rate = read_audio(path)
    if kind == "fbank":
        features = compute_fbank(audio, rate)
    else:
        features = resample(torch.as_tensor(audio, dtype=torch.float32), rate, SAMPLE_RATE).unsqueeze(1)
    return features[None], torch.tensor([features.shape[0]])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a recipe checkpoint (runs/<method>/model.pt + its .json)")
    parser.add_argument(
        "--out",
        type=Path,
        nargs="+",
        required=True,
        help=f"output files; the suffix picks the format: {', '.join(FORMATS)}",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--layers", type=int, nargs="+", metavar="LAYER", help="run these layers (0-based indices), final head"
    )
    budget.add_argument("--n-layers", type=int, help="run n layers chosen by --strategy, final head")
    budget.add_argument(
        "--exit-depth", type=int, metavar="E", help="run the first E layers and read the exit head at depth E"
    )
    budget.add_argument("--selector-k", type=int, help="the selector's k layers for the utterance --audio")
    budget.add_argument(
        "--early-exit",
        action="store_true",
        help="runtime early exit for one utterance: the threshold is an input of the graph",
    )
    parser.add_argument(
        "--strategy",
        choices=("every_other", "first"),
        default="every_other",
        help="layers of --n-layers (default every_other)",
    )
    parser.add_argument(
        "--criterion",
        choices=GRAPH_CRITERIA,
        default="max_prob",
        help="exit criterion of --early-exit (default max_prob: mean frame max-posterior)",
    )
    parser.add_argument("--audio", type=Path, help="the utterance a per-utterance budget (--selector-k) is decided for")
    parser.add_argument("--int8", action="store_true", help="also write <name>.int8.onnx (dynamic int8 linears)")
    parser.add_argument(
        "--max-frames",
        type=int,
        default=MAX_FRAMES,
        help=f"longest input in feature frames (default {MAX_FRAMES}: 30 s at 10 ms)",
    )


def run(args: argparse.Namespace) -> int:
    if args.max_frames < MIN_FRAMES:
        raise ValueError(f"--max-frames must be >= {MIN_FRAMES}, got {args.max_frames}")
    if args.int8 and not any(path.suffix == ".onnx" for path in args.out):
        raise ValueError("--int8 quantizes an ONNX file: add a .onnx file to --out")
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    if args.early_exit:
        graph: ExportGraph = EarlyExitGraph(model, args.criterion)
    else:
        features, lengths = _utterance(args.audio, model.config.input_features)
        graph = fixed_budget_graph(
            model, _budget_from_args(args), layers=args.layers, features=features, lengths=lengths
        )
    for path in save(graph, args.out, args.max_frames):
        print(f"wrote {path} ({FORMATS[path.suffix]}; {graph.metadata()})")
        if args.int8 and path.suffix == ".onnx":
            print(f"wrote {quantize_int8(path, path.with_suffix('.int8.onnx'))} (dynamic int8 linears)")
    return 0
