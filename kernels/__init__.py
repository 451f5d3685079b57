"""Triton GPU kernels of the dynenc ops (importable as ``dynenc.kernels``).

``kernels/<module>.py`` holds the launcher of every op that :data:`dynenc.ops.OPS` maps to
``<module>``, named like the op; it takes and returns torch tensors exactly like the
``dynenc::`` op (schemas: ``csrc/<module>.cpp``, semantics and references:
``dynenc/ops/<module>.py``). Launchers trust their arguments: the op's CUDA registration
validates them first. Traffic models: README.md.
"""
import importlib

from dynenc.ops.registry import OPS

from . import _utils
from .attention import varlen_attention, varlen_attention_backward
from .dwconv import varlen_dwconv1d, varlen_dwconv1d_backward
from .norm import add_layer_norm, add_layer_norm_backward
from .plan import build_plan
from .rows import gated_residual_scatter, gated_residual_scatter_backward, gather_rows, scatter_rows

#: module name -> launcher module, for every module :data:`dynenc.ops.OPS` names (in its order).
MODULES = {name: importlib.import_module(f"{__name__}.{name}") for name in dict.fromkeys(OPS.values())}


def launcher(name: str):
    """The Triton launcher of op ``name``."""
    return getattr(MODULES[OPS[name]], name)


def aot_calls(arch: str):
    """Every Triton launch the launchers make on ``arch`` (``"sm_86"``, ``"gfx90a"``), one
    :class:`~dynenc.kernels.specialization.KernelCall` per (kernel, variant), with the launch
    configs they choose there: what ``python -m dynenc.kernels.report`` compiles and checks."""
    return [call for module in (_utils, *MODULES.values()) for call in module.aot_calls(arch)]


# Every launcher under its op's name (``dynenc.kernels.gather_rows``, ...), in OPS's order.
__all__ = [
    "MODULES",
    "aot_calls",
    "launcher",
    "gated_residual_scatter",
    "gated_residual_scatter_backward",
    "gather_rows",
    "scatter_rows",
    "varlen_dwconv1d",
    "varlen_dwconv1d_backward",
    "varlen_attention",
    "varlen_attention_backward",
    "build_plan",
    "add_layer_norm",
    "add_layer_norm_backward",
]

# Adding an op to OPS means importing its launcher above and listing it here too.
_unexported = [name for name in OPS if name not in __all__ or name not in globals()]
if _unexported:
    raise ImportError(f"dynenc.kernels does not re-export the launchers of {', '.join(_unexported)}: "
                      "import them in kernels/__init__.py and add them to __all__")
