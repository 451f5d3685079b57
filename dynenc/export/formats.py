"""Writing and running an exported graph: ``torch.export`` programs, ONNX (fp32 and dynamic
int8), ExecuTorch, and ONNX Runtime sessions (see :mod:`dynenc.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .graphs import EarlyExitGraph, FixedBudgetGraph

FORMATS = {".onnx": "ONNX (ONNX Runtime)", ".pt2": "torch.export program", ".pte": "ExecuTorch program"}
#: Front-end receptive field: the shortest input with an output frame.
MIN_FRAMES = 7
#: Longest input (feature frames) of an exported graph: ExecuTorch plans memory for it.
MAX_FRAMES = 3000


# ============================================================================ formats
#: The graphs :func:`save` exports.
ExportGraph = Union[FixedBudgetGraph, EarlyExitGraph]


def example_inputs(graph: ExportGraph, frames: int = 203) -> Tuple[Tensor, ...]:
    """Inputs ``torch.export`` traces ``graph`` with (random features, ``frames`` 10 ms frames of
    them, or waveforms ``[B, S, 1]`` as long; batch 2, or 1 for early exit)."""
    rows = frames * graph.rows_per_frame
    if isinstance(graph, EarlyExitGraph):
        return torch.randn(1, rows, graph.num_features), torch.tensor([rows]), torch.tensor(0.5)
    return torch.randn(2, rows, graph.num_features), torch.tensor([rows, rows - 40 * graph.rows_per_frame])


def export_program(graph: nn.Module, max_frames: int = MAX_FRAMES) -> torch.export.ExportedProgram:
    """``torch.export`` of a graph above: the number of feature frames is dynamic (up to
    ``max_frames``), and so is the batch of a fixed-budget graph."""
    if not isinstance(graph, (FixedBudgetGraph, EarlyExitGraph)):
        raise TypeError(f"graph must be a FixedBudgetGraph or an EarlyExitGraph, got {type(graph).__name__}")
    graph.eval()
    # DYNAMIC, not a named Dim: the front-end's (T - 3) // 4 leads to guards (T' != 1) that export
    # keeps as input checks instead of refusing the range.
    frames = torch.export.Dim.DYNAMIC(min=MIN_FRAMES * graph.rows_per_frame, max=max_frames * graph.rows_per_frame)
    dynamic_shapes: Tuple[Optional[Dict[int, Any]], ...]
    if isinstance(graph, EarlyExitGraph):
        dynamic_shapes = ({1: frames}, None, None)
    else:
        batch = torch.export.Dim.DYNAMIC(min=1, max=1024)
        dynamic_shapes = ({0: batch, 1: frames}, {0: batch})
    with torch.no_grad():
        return torch.export.export(graph, example_inputs(graph), dynamic_shapes=dynamic_shapes)


def save(graph: ExportGraph, paths: Union[Path, Sequence[Path]], max_frames: int = MAX_FRAMES) -> List[Path]:
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


def _save_onnx(program: torch.export.ExportedProgram, graph: ExportGraph, path: Path) -> None:
    output_names = ["log_probs", "out_lengths"] + (["exit_depth"] if isinstance(graph, EarlyExitGraph) else [])
    onnx_program = torch.onnx.export(
        program, dynamo=True, input_names=_input_names(graph), output_names=output_names, verbose=False
    )
    if onnx_program is None:  # only the TorchScript exporter (dynamo=False) may return None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    onnx_program.model.metadata_props.update(graph.metadata())
    onnx_program.save(str(path))


def _input_names(graph: nn.Module) -> List[str]:
    return ["features", "lengths"] + (["threshold"] if isinstance(graph, EarlyExitGraph) else [])


def _executorch_buffer(program: torch.export.ExportedProgram) -> bytes:
    try:
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise ValueError(
            f"a .pte file needs the optional executorch package (pip install executorch; it leaves "
            f"torch as it is): {error}"
        ) from error
    # Portable kernels: the XNNPACK delegate refuses reshapes with two dynamic dimensions (batch, frames).
    return to_edge_transform_and_lower(program).to_executorch().buffer


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    """Dynamic int8 quantization of the linears (ONNX Runtime's ``quantize_dynamic``): MatMul /
    Gemm with a constant weight get int8 weights and per-call int8 activations; attention's
    activation x activation products, convolutions and norms stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(onnx_path),
        str(out_path),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        extra_options={"MatMulConstBOnly": True},
    )
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
