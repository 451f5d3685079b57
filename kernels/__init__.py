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

MODULES = {name: importlib.import_module(f"{__name__}.{name}") for name in dict.fromkeys(OPS.values())}


def launcher(name: str):
    """The Triton launcher of op ``name``."""
    return getattr(MODULES[OPS[name]], name)


# Every launcher under its op's name (``dynenc.kernels.gather_rows``, ...).
globals().update({name: launcher(name) for name in OPS})


def aot_calls(arch: str):
    """Every Triton launch the launchers make on ``arch`` (``"sm_86"``, ``"gfx90a"``), one
    :class:`~dynenc.kernels.specialization.KernelCall` per (kernel, variant), with the launch
    configs they choose there: what ``python -m dynenc.kernels.report`` compiles and checks."""
    return [call for module in (_utils, *MODULES.values()) for call in module.aot_calls(arch)]


__all__ = ["MODULES", "aot_calls", "launcher", *OPS]
