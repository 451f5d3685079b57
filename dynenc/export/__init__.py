"""``dynenc.export``: a trained CTC model as a static graph of standard ATen ops, for runtimes
that have no ``dynenc::`` op (ONNX Runtime, ``torch.export`` programs, ExecuTorch).

Two kinds of graph, both built from the model's front-end, the padded twin of its encoder
(:class:`~dynenc.padded.PaddedConformer`, which shares the parameters) and its CTC heads:

* :class:`FixedBudgetGraph` — one fixed budget (:class:`ExportPlan`): only the executed
  layers and the head that reads them are in the graph. ``(features [B, T, F] float32,
  lengths [B] int64) -> (log_probs [B, T', V], lengths [B])``; batch and length dynamic.
* :class:`EarlyExitGraph` — runtime early exit for one utterance (batch 1, the on-device
  case): at each exit depth a ``torch.cond`` stops when the utterance's mean frame
  confidence reaches ``threshold``, an input, so one file serves every budget.
  ``(features [1, T, F], lengths [1] int64, threshold [] float32) -> (log_probs [1, T', V],
  lengths [1], exit_depth [1] int64)``. The criterion (``max_prob``, default, or ``entropy``)
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
    >>> log_probs, lengths, exit_depth = run_onnx(session, features, lengths, threshold=0.9)
"""

from .formats import (
    FORMATS,
    MAX_FRAMES,
    MIN_FRAMES,
    ExportGraph,
    example_inputs,
    export_program,
    onnx_session,
    quantize_int8,
    run_onnx,
    save,
)
from .graphs import (
    GRAPH_CRITERIA,
    EarlyExitGraph,
    ExportPlan,
    FixedBudgetGraph,
    budget_plan,
    fixed_budget_graph,
    layers_plan,
)

__all__ = [
    "FORMATS",
    "GRAPH_CRITERIA",
    "MAX_FRAMES",
    "MIN_FRAMES",
    "EarlyExitGraph",
    "ExportGraph",
    "ExportPlan",
    "FixedBudgetGraph",
    "budget_plan",
    "example_inputs",
    "export_program",
    "fixed_budget_graph",
    "layers_plan",
    "onnx_session",
    "quantize_int8",
    "run_onnx",
    "save",
]
