"""Triton GPU kernels of the dynenc ops (importable as ``dynenc.kernels``).

``kernels/<module>.py`` holds the launcher of every op that :data:`dynenc.ops.OPS` maps to
``<module>``, named like the op; it takes and returns torch tensors exactly like the
``dynenc::`` op (schemas: ``csrc/<module>.cpp``, semantics and references:
``dynenc/ops/<module>.py``). The launchers in ``kernels/<module>.py`` trust their arguments (an
out-of-range index reads out of bounds); the names this package exports are the validated
ones, the op's CUDA registration (:data:`dynenc.ops.registry.CUDA_KERNELS`): the op's shape,
dtype and device checks, then its value checks (index ranges, ``cu_seqlens``, ``max_seqlen``),
then the launcher. Traffic models: README.md.
"""
import importlib

from dynenc.ops.registry import CUDA_KERNELS, OPS

from . import _utils

# The validated launchers, under the ops' names.
gated_residual_scatter = CUDA_KERNELS["gated_residual_scatter"]
gated_residual_scatter_backward = CUDA_KERNELS["gated_residual_scatter_backward"]
gather_rows = CUDA_KERNELS["gather_rows"]
scatter_rows = CUDA_KERNELS["scatter_rows"]
varlen_dwconv1d = CUDA_KERNELS["varlen_dwconv1d"]
varlen_dwconv1d_backward = CUDA_KERNELS["varlen_dwconv1d_backward"]
varlen_attention = CUDA_KERNELS["varlen_attention"]
varlen_attention_backward = CUDA_KERNELS["varlen_attention_backward"]
build_plan = CUDA_KERNELS["build_plan"]
add_layer_norm = CUDA_KERNELS["add_layer_norm"]
add_layer_norm_backward = CUDA_KERNELS["add_layer_norm_backward"]

#: module name -> launcher module, for every module :data:`dynenc.ops.OPS` names (in its order).
MODULES = {name: importlib.import_module(f"{__name__}.{name}") for name in dict.fromkeys(OPS.values())}


def launcher(name: str):
    """The raw Triton launcher of op ``name`` (no checks: its caller vouches for the arguments)."""
    return getattr(MODULES[OPS[name]], name)


def aot_calls(arch: str):
    """Every Triton launch the launchers make on ``arch`` (``"sm_86"``, ``"gfx90a"``), one
    :class:`~dynenc.kernels.specialization.KernelCall` per (kernel, variant), with the launch
    configs they choose there: what ``python -m dynenc.kernels.report`` compiles and checks."""
    return [call for module in (_utils, *MODULES.values()) for call in module.aot_calls(arch)]


# Every validated launcher under its op's name (``dynenc.kernels.gather_rows``, ...), in OPS's order.
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

# Adding an op to OPS means exporting its validated launcher above and listing it here too.
_unexported = [name for name in OPS if name not in __all__ or name not in globals()]
if _unexported:
    raise ImportError(f"dynenc.kernels does not re-export the launchers of {', '.join(_unexported)}: "
                      "import them in kernels/__init__.py and add them to __all__")
