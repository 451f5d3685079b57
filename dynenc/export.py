"""``dynenc export``: a trained CTC model as a static graph of standard ATen ops, for runtimes
that have no ``dynenc::`` op (ONNX Runtime, ``torch.export`` programs, ExecuTorch).

Two kinds of graph, both built from the model's front-end, the padded twin of its encoder
(:class:`~dynenc.padded.PaddedConformer`, which shares the parameters) and its CTC heads:

* :class:`FixedBudgetGraph` — one fixed budget (:class:`ExportPlan`): only the executed
  layers and the head that reads them are in the graph. ``(features [B, T, F] float32,
  lengths [B] int64) -> (log_probs [B, T', V], lengths [B])``; batch and length dynamic.
* :class:`EarlyExitGraph` — runtime early exit for one utterance (batch 1, the on-device
  case): after each exit layer a ``torch.cond`` stops when the utterance's mean frame
  confidence reaches ``threshold``, an input, so one file serves every budget.
  ``(features [1, T, F], lengths [1] int64, threshold [] float32) -> (log_probs [1, T', V],
  lengths [1], exit_layer [1] int64)``. The criterion (``max_prob``, default, or ``entropy``)
  is fixed at export. The paper's N-best posterior criterion needs a beam search at every
  exit, which has no place in a static graph: it is not exportable.

Formats, by the file's suffix: ``.onnx`` (``torch.onnx.export(..., dynamo=True)``, for ONNX
Runtime; :func:`quantize_int8` makes a dynamic-int8 copy), ``.pt2`` (``torch.export.save``)
and ``.pte`` (ExecuTorch, portable kernels; needs the optional ``executorch`` package).
Padded output frames (``t >= lengths[b]``) carry no meaning.

Example::

    >>> model, _ = dynenc.asr.load_checkpoint("runs/early_exit/model.pt")
    >>> save(fixed_budget_graph(model, LayerDropBudget(4)), "half.onnx")
    >>> save(EarlyExitGraph(model), "exits.onnx")
    >>> session = onnx_session("exits.onnx", threads=1)
    >>> log_probs, lengths, exit_layer = run_onnx(session, features, lengths, threshold=0.9)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .asr import CTCModel, load_checkpoint
from .methods import (BlankSkipBudget, Budget, EarlyExitBudget, FullBudget, LayerDropBudget, SelectorBudget,
                      fixed_layers_mask, frame_confidence, infer)
from .padded import PaddedConformer
from .routing import valid_frames

#: Exit criteria a graph can hold: per-frame confidences averaged over the utterance. The
#: authors' ``nbest_posterior`` needs a beam search at every exit: not in a static graph.
GRAPH_CRITERIA = ("max_prob", "entropy")
FORMATS = {".onnx": "ONNX (ONNX Runtime)", ".pt2": "torch.export program", ".pte": "ExecuTorch program"}
#: Front-end receptive field: the shortest input with an output frame.
MIN_FRAMES = 7
#: Longest input (feature frames) of an exported graph: ExecuTorch plans memory for it.
MAX_FRAMES = 3000


# ============================================================================ what a graph runs
@dataclass(frozen=True)
class ExportPlan:
    """The fixed budget of one static graph: the 1-based ``layers`` that run (sorted) and the
    1-based ``head_layer`` whose CTC head reads the output (the last layer = the final head)."""

    layers: Tuple[int, ...]
    head_layer: int

    def check(self, model: CTCModel) -> None:
        exits = model.config.exit_set
        if self.head_layer not in exits:
            raise ValueError(f"head_layer must be one of the model's exit layers {list(exits)}, got {self.head_layer}")
        if not set(self.layers) <= set(range(1, self.head_layer + 1)) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct 1-based layers in [1, {self.head_layer}] (the head's layer), "
                             f"got {list(self.layers)}")


def layers_plan(model: CTCModel, layers: Sequence[int]) -> ExportPlan:
    """The plan running the given 1-based ``layers`` with the final CTC head."""
    if isinstance(layers, (str, bytes)) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise TypeError(f"layers must be a sequence of ints (1-based layers), got {layers!r}")
    plan = ExportPlan(tuple(sorted(layers)), model.config.num_layers)
    plan.check(model)
    return plan


def budget_plan(model: CTCModel, budget: Budget, features: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> ExportPlan:
    """The :class:`ExportPlan` equal to ``budget`` (a :mod:`dynenc.methods` budget).

    Budgets that decide per input (a selector's k, random layer dropping, an early-exit
    threshold) need the ONE utterance they are decided for: ``features [1, T, F]`` and
    ``lengths [1]``; the graph then runs that utterance's decision for any input. CTC-blank
    frame skipping decides per frame: no static graph expresses it.
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a dynenc.methods budget, got {type(budget).__name__}")
    if isinstance(budget, BlankSkipBudget):
        raise ValueError("a BlankSkipBudget decides per frame at run time: it cannot be exported as a static graph")
    budget.check(model)
    num_layers = model.config.num_layers
    if isinstance(budget, FullBudget):
        return ExportPlan(tuple(range(1, num_layers + 1)), num_layers)
    if isinstance(budget, EarlyExitBudget) and budget.fixed_exit is not None:
        return ExportPlan(tuple(range(1, budget.fixed_exit + 1)), budget.fixed_exit)
    if isinstance(budget, LayerDropBudget) and budget.strategy != "random":
        mask = fixed_layers_mask(num_layers, budget.layers, 1, budget.strategy)[0]
        return ExportPlan(tuple(int(l) + 1 for l in mask.nonzero().flatten()), num_layers)
    if features is None or lengths is None or features.dim() != 3 or features.shape[0] != 1:
        raise ValueError(f"a {type(budget).__name__} decides per utterance: pass the ONE utterance it is exported "
                         f"for (features [1, T, F] and lengths [1]), or export runtime early exit (EarlyExitGraph)")
    decisions = infer(model, features, lengths, budget).decisions
    if decisions.exit_layer is not None:
        exit_layer = int(decisions.exit_layer[0])
        return ExportPlan(tuple(range(1, exit_layer + 1)), exit_layer)
    return ExportPlan(tuple(int(l) + 1 for l in decisions.layer_mask[0].nonzero().flatten()), num_layers)


def _layer_span(model: CTCModel, executed: Sequence[int], start: int, stop: int) -> PaddedConformer:
    """The padded twin of the encoder running 1-based layers ``start+1..stop`` of which only
    ``executed`` compute (a skipped layer is the encoder's ``skip_mode``). Layers outside the
    span are left out of the module, so they are not in the graph at all."""
    return PaddedConformer(model.encoder, layers=[l - 1 for l in executed], start=start, stop=stop)


def _masked_mean(values: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``values [B, T]`` over each utterance's valid frames -> ``[B]`` (0 when empty)."""
    valid = valid_frames(lengths, values.shape[1]).to(values.dtype)
    return (values * valid).sum(1) / lengths.clamp_min(1).to(values.dtype)


# ============================================================================ graphs
class FixedBudgetGraph(nn.Module):
    """``(features [B, T, F], lengths [B] int64) -> (log_probs [B, T', V], lengths [B])``:
    the front-end, the plan's layers and the head of ``plan.head_layer`` (shared parameters)."""

    def __init__(self, model: CTCModel, plan: ExportPlan) -> None:
        super().__init__()
        plan.check(model)
        self.plan = plan
        self.num_features = model.config.num_features
        self.frontend = model.frontend
        self.encoder = _layer_span(model, plan.layers, 0, plan.head_layer)
        self.head = model.exit_head(plan.head_layer)
        self.eval()  # inference only (the padded twin refuses training mode)

    def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        x, lengths = self.frontend(features, lengths)
        x, _ = self.encoder(x, lengths)
        return F.log_softmax(self.head(x), dim=-1), lengths

    def metadata(self) -> Dict[str, str]:
        return {"dynenc.graph": "fixed_budget", "dynenc.layers": " ".join(map(str, self.plan.layers)),
                "dynenc.head_layer": str(self.plan.head_layer)}


class EarlyExitGraph(nn.Module):
    """Runtime early exit for one utterance: ``(features [1, T, F], lengths [1] int64,
    threshold [] float32) -> (log_probs [1, T', V], lengths [1], exit_layer [1] int64)``.

    After each exit layer e < L the utterance stops when the mean over its valid frames of
    ``frame_confidence(log_softmax(head_e(x)), criterion)`` is ``>= threshold`` — what
    :class:`~dynenc.methods.EarlyExitBudget` decides in eager mode; otherwise the next span of
    layers runs (a nested ``torch.cond``, so later layers are never computed after an exit).
    """

    def __init__(self, model: CTCModel, criterion: str = "max_prob") -> None:
        super().__init__()
        if criterion not in GRAPH_CRITERIA:
            raise ValueError(f"criterion must be one of {GRAPH_CRITERIA} (the N-best posterior needs a beam search, "
                             f"which no static graph holds), got {criterion!r}")
        self.exit_layers = model.config.exit_set
        if len(self.exit_layers) == 1:
            raise ValueError("runtime early exit needs a model with early-exit heads (ModelConfig.exit_layers)")
        self.criterion = criterion
        self.num_features = model.config.num_features
        self.frontend = model.frontend
        every_layer = range(1, model.config.num_layers + 1)
        starts = (0,) + self.exit_layers[:-1]
        self.spans = nn.ModuleList(_layer_span(model, every_layer, start, stop)
                                   for start, stop in zip(starts, self.exit_layers))
        self.heads = nn.ModuleList(model.exit_head(layer) for layer in self.exit_layers)
        self.eval()  # inference only (the padded twin refuses training mode)

    def forward(self, features: Tensor, lengths: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x, lengths = self.frontend(features, lengths)
        log_probs, exit_layer = self._from_span(0, x, lengths, threshold)
        return log_probs, lengths, exit_layer

    def _from_span(self, index: int, x: Tensor, lengths: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor]:
        """Run span ``index`` and the ones after it until an exit; ``(log_probs, exit_layer)``."""
        x, _ = self.spans[index](x, lengths)
        log_probs = F.log_softmax(self.heads[index](x), dim=-1)
        exit_layer = torch.full((1,), self.exit_layers[index], dtype=torch.int64)
        if index == len(self.spans) - 1:
            return log_probs, exit_layer
        confidence = _masked_mean(frame_confidence(log_probs, self.criterion), lengths)

        def stop(x: Tensor, lengths: Tensor, log_probs: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor]:
            return log_probs.clone(), exit_layer.clone()  # a branch may not return its inputs themselves

        def go_on(x: Tensor, lengths: Tensor, log_probs: Tensor, threshold: Tensor) -> Tuple[Tensor, Tensor]:
            return self._from_span(index + 1, x, lengths, threshold)

        return torch.cond((confidence >= threshold).all(), stop, go_on, (x, lengths, log_probs, threshold))

    def metadata(self) -> Dict[str, str]:
        return {"dynenc.graph": "early_exit", "dynenc.exit_layers": " ".join(map(str, self.exit_layers)),
                "dynenc.criterion": self.criterion}


def fixed_budget_graph(model: CTCModel, budget: Optional[Budget] = None, *, layers: Optional[Sequence[int]] = None,
                       features: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> FixedBudgetGraph:
    """The static graph of ``budget`` (see :func:`budget_plan`) or of the 1-based ``layers``
    with the final head (exactly one of the two), in eval mode."""
    if (budget is None) == (layers is None):
        raise ValueError("fixed_budget_graph needs exactly one of budget and layers")
    plan = layers_plan(model, layers) if layers is not None else budget_plan(model, budget, features, lengths)
    return FixedBudgetGraph(model, plan)


# ============================================================================ formats
def example_inputs(graph: nn.Module, frames: int = 203) -> Tuple[Tensor, ...]:
    """Inputs ``torch.export`` traces ``graph`` with (random features; batch 2, or 1 for early exit)."""
    if isinstance(graph, EarlyExitGraph):
        return torch.randn(1, frames, graph.num_features), torch.tensor([frames]), torch.tensor(0.5)
    return torch.randn(2, frames, graph.num_features), torch.tensor([frames, frames - 40])


def export_program(graph: nn.Module, max_frames: int = MAX_FRAMES) -> torch.export.ExportedProgram:
    """``torch.export`` of a graph above: the number of feature frames is dynamic (up to
    ``max_frames``), and so is the batch of a fixed-budget graph."""
    if not isinstance(graph, (FixedBudgetGraph, EarlyExitGraph)):
        raise TypeError(f"graph must be a FixedBudgetGraph or an EarlyExitGraph, got {type(graph).__name__}")
    graph.eval()
    # DYNAMIC, not a named Dim: the front-end's (T - 3) // 4 leads to guards (T' != 1) that export
    # keeps as input checks instead of refusing the range.
    frames = torch.export.Dim.DYNAMIC(min=MIN_FRAMES, max=max_frames)
    if isinstance(graph, EarlyExitGraph):
        dynamic_shapes = ({1: frames}, None, None)
    else:
        batch = torch.export.Dim.DYNAMIC(min=1, max=1024)
        dynamic_shapes = ({0: batch, 1: frames}, {0: batch})
    with torch.no_grad():
        return torch.export.export(graph, example_inputs(graph), dynamic_shapes=dynamic_shapes)


def save(graph: nn.Module, paths: Union[Path, Sequence[Path]], max_frames: int = MAX_FRAMES) -> List[Path]:
    """Export ``graph`` once and write it to each of ``paths`` in the format its suffix names
    (:data:`FORMATS`)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for path in paths:
        if path.suffix not in FORMATS:
            raise ValueError(f"an output file must end in one of {list(FORMATS)}, got {path.name!r}")
    program = export_program(graph, max_frames)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".pt2":
            torch.export.save(program, path)
        elif path.suffix == ".onnx":
            _save_onnx(program, graph, path)
        else:
            path.write_bytes(_executorch_buffer(program))
    return paths


def _save_onnx(program: torch.export.ExportedProgram, graph: nn.Module, path: Path) -> None:
    output_names = ["log_probs", "out_lengths"] + (["exit_layer"] if isinstance(graph, EarlyExitGraph) else [])
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=_input_names(graph), output_names=output_names,
                                     verbose=False)
    onnx_program.model.metadata_props.update(graph.metadata())
    onnx_program.save(str(path))


def _input_names(graph: nn.Module) -> List[str]:
    return ["features", "lengths"] + (["threshold"] if isinstance(graph, EarlyExitGraph) else [])


def _executorch_buffer(program: torch.export.ExportedProgram) -> bytes:
    try:
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise ValueError(f"a .pte file needs the optional executorch package (pip install executorch; it leaves "
                         f"torch as it is): {error}") from error
    # Portable kernels: the XNNPACK delegate refuses reshapes with two dynamic dimensions (batch, frames).
    return to_edge_transform_and_lower(program).to_executorch().buffer


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantization of the linears (ONNX Runtime's ``quantize_dynamic``): MatMul /
    Gemm with a constant weight get int8 weights and per-call int8 activations; attention's
    activation x activation products, convolutions and norms stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
    return Path(out_path)


# ============================================================================ running
def onnx_session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (all graph optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's worker threads spin between runs by default: beside PyTorch in one process (the
    # bench, an app that runs both) they would steal its cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, features: Tensor, lengths: Tensor, threshold: Optional[float] = None) -> List[np.ndarray]:
    """The session's outputs for ``features [B, T, F]``, ``lengths [B]`` (+ the exit
    ``threshold`` of an early-exit graph)."""
    feeds = {"features": features.float().numpy(), "lengths": lengths.long().numpy()}
    if threshold is not None:
        feeds["threshold"] = np.asarray(threshold, dtype=np.float32)
    return session.run(None, feeds)


# ============================================================================ CLI
def _budget_from_args(args: argparse.Namespace) -> Optional[Budget]:
    """The budget the flags name (None for ``--layers`` or ``--early-exit``)."""
    if args.n_layers is not None:
        return LayerDropBudget(args.n_layers, args.strategy)
    if args.exit_layer is not None:
        return EarlyExitBudget(fixed_exit=args.exit_layer)
    if args.selector_k is not None:
        return SelectorBudget(k=args.selector_k)
    return None if args.layers is not None or args.early_exit else FullBudget()


def _utterance(path: Optional[Path]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Fbank features ``[1, T, 80]`` and lengths ``[1]`` of an audio file (None without one)."""
    if path is None:
        return None, None
    from .recipe.features import compute_fbank, read_audio

    features = compute_fbank(*read_audio(path))
    return features[None], torch.tensor([features.shape[0]])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a recipe checkpoint (runs/<method>/model.pt + its .json)")
    parser.add_argument("--out", type=Path, nargs="+", required=True,
                        help=f"output files; the suffix picks the format: {', '.join(FORMATS)}")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--layers", type=int, nargs="+", help="run these 1-based layers, final head")
    budget.add_argument("--n-layers", type=int, help="run n layers chosen by --strategy, final head")
    budget.add_argument("--exit-layer", type=int, help="run layers 1..e and read exit head e")
    budget.add_argument("--selector-k", type=int, help="the selector's k layers for the utterance --audio")
    budget.add_argument("--early-exit", action="store_true",
                        help="runtime early exit for one utterance: the threshold is an input of the graph")
    parser.add_argument("--strategy", choices=("every_other", "first"), default="every_other",
                        help="layers of --n-layers (default every_other)")
    parser.add_argument("--criterion", choices=GRAPH_CRITERIA, default="max_prob",
                        help="exit criterion of --early-exit (default max_prob: mean frame max-posterior)")
    parser.add_argument("--audio", type=Path, help="the utterance a per-utterance budget (--selector-k) is decided for")
    parser.add_argument("--int8", action="store_true", help="also write <name>.int8.onnx (dynamic int8 linears)")
    parser.add_argument("--max-frames", type=int, default=MAX_FRAMES,
                        help=f"longest input in feature frames (default {MAX_FRAMES}: 30 s at 10 ms)")


def run(args: argparse.Namespace) -> int:
    if args.max_frames < MIN_FRAMES:
        raise ValueError(f"--max-frames must be >= {MIN_FRAMES}, got {args.max_frames}")
    if args.int8 and not any(path.suffix == ".onnx" for path in args.out):
        raise ValueError("--int8 quantizes an ONNX file: add a .onnx file to --out")
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    if args.early_exit:
        graph: nn.Module = EarlyExitGraph(model, args.criterion)
    else:
        features, lengths = _utterance(args.audio)
        graph = fixed_budget_graph(model, _budget_from_args(args), layers=args.layers, features=features,
                                   lengths=lengths)
    for path in save(graph, args.out, args.max_frames):
        print(f"wrote {path} ({FORMATS[path.suffix]}; {graph.metadata()})")
        if args.int8 and path.suffix == ".onnx":
            print(f"wrote {quantize_int8(path, path.with_suffix('.int8.onnx'))} (dynamic int8 linears)")
    return 0
