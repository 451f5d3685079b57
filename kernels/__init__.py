"""Triton GPU kernels of the dynenc ops (importable as ``dynenc.kernels``).

Each launcher takes and returns torch tensors exactly like the ``dynenc::`` op of the same name
(schemas: csrc/registration.cpp, semantics: dynenc/reference.py). Traffic models: README.md.
"""
from . import _utils, attention, dwconv, gated_scatter, plan, rows
from .attention import varlen_attention, varlen_attention_backward
from .dwconv import varlen_dwconv1d, varlen_dwconv1d_backward
from .gated_scatter import gated_residual_scatter, gated_residual_scatter_backward
from .plan import build_plan
from .rows import gather_rows, scatter_rows

_MODULES = (_utils, gated_scatter, rows, dwconv, attention, plan)


def aot_specs(backend=None):
    """``[(name, jit_fn, signature, constexprs)]`` covering every ``@triton.jit`` kernel of the
    package, for ``triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target)``.

    ``backend`` ('cuda' / 'hip') picks the variants the launchers use there (fp32 attention
    dots: 3xTF32 on CUDA); ``None`` gives variants that compile for every target."""
    return [spec for module in _MODULES for spec in module.aot_specs(backend)]


__all__ = [
    "aot_specs",
    "build_plan",
    "gated_residual_scatter",
    "gated_residual_scatter_backward",
    "gather_rows",
    "scatter_rows",
    "varlen_attention",
    "varlen_attention_backward",
    "varlen_dwconv1d",
    "varlen_dwconv1d_backward",
]
