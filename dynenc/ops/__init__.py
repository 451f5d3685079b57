"""The one op registry: every ``dynenc::`` op, its backends and its public function.

Each op module (``dynenc/ops/<module>.py``, named in :data:`OPS`) holds, top to bottom: the
plain-PyTorch reference (``reference_<op>``, the test oracle), the argument validation, the
CUDA (Triton) registration, the fake impl (``torch.compile`` / ``torch.export``), the autograd
formula (backward passes are ops too, with their own kernels) and the public function.
Schemas and CPU kernels come from the C++ extension (``csrc/<module>.cpp``, loaded as
``dynenc._C``); Triton launchers from ``kernels/<module>.py`` (``dynenc.kernels``).

Modules call the public functions, never a backend. The backend is chosen per thread /
context with :func:`use_backend`: ``"native"`` (C++ on CPU, Triton on CUDA; no silent
fallback) or ``"reference"``.

Dtypes: float32/float64 everywhere; bfloat16/float16 on CPU (C++, fp32 accumulation) and on
CUDA (Triton, fp32 accumulation).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

import dynenc._C as _C  # noqa: F401  (registers the dynenc:: schemas and CPU kernels)

from .registry import BACKENDS, OPS, current_backend, use_backend

_missing = [name for name in OPS if not hasattr(torch.ops.dynenc, name)]
if _missing:
    raise ImportError(
        f"dynenc._C registers no {', '.join(_missing)}: the C++ extension is older than csrc/; "
        "rebuild it (pip install --no-build-isolation -e .)"
    )

# The public functions of every op module (its ``__all__``). The op modules register their CUDA
# kernels, fake impls and autograd against the schemas checked above, hence after the check.
from .attention import materialized_position_bias, relative_position_buckets, varlen_attention  # noqa: E402
from .dwconv import varlen_dwconv1d  # noqa: E402
from .norm import add_layer_norm  # noqa: E402
from .plan import build_plan  # noqa: E402
from .rows import gated_residual_scatter, gather_rows, scatter_rows  # noqa: E402

#: module name -> op module, for every module :data:`OPS` names (in the table's order).
MODULES = {name: importlib.import_module(f"{__name__}.{name}") for name in dict.fromkeys(OPS.values())}

__all__ = [
    "BACKENDS",
    "MODULES",
    "OPS",
    "current_backend",
    "reference",
    "use_backend",
    # rows
    "gated_residual_scatter",
    "gather_rows",
    "scatter_rows",
    # dwconv
    "varlen_dwconv1d",
    # attention
    "materialized_position_bias",
    "relative_position_buckets",
    "varlen_attention",
    # plan
    "build_plan",
    # norm
    "add_layer_norm",
]

# Adding an op (to OPS and its module's __all__) means re-exporting it above too.
_unexported = [
    f"{module.__name__}.{name}"
    for module in MODULES.values()
    for name in module.__all__
    if name not in __all__ or name not in globals()
]
if _unexported:
    raise ImportError(
        f"dynenc.ops does not re-export {', '.join(_unexported)}: import it in dynenc/ops/__init__.py "
        "and add it to __all__"
    )


def reference(name: str) -> Callable:
    """The plain-PyTorch reference of the forward op ``name`` (e.g. ``"gather_rows"``)."""
    if name not in OPS or name.endswith("_backward"):
        forward = sorted(n for n in OPS if not n.endswith("_backward"))
        raise ValueError(f"name must be a forward op, one of {forward}, got {name!r}")
    return getattr(MODULES[OPS[name]], f"reference_{name}")
