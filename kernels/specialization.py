"""What the Triton JIT compiles for a launch, computed without a GPU.

``kernel[grid](*args, **kwargs)`` binds its arguments with a binder generated from the kernel's
signature (``triton.runtime.jit.create_function_from_signature``): tensors get a 16-byte
alignment attribute, ints ``== 1`` become constexprs and ints ``% 16 == 0`` a divisibility
attribute (unless listed in ``do_not_specialize``). The resulting specialization list is the
JIT's cache key; ``JITFunction._pack_args`` turns it into the ``(signature, constexprs,
attrs)`` of the ``ASTSource`` it compiles. Both are mirrored here for any target, so the AOT
report compiles exactly what the JIT would and tests can count the JIT's variants.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature


class KernelCall(NamedTuple):
    """One launch of ``kernel`` as a launcher makes it: positional ``args`` (tensors may live on
    the ``meta`` device: only dtype and address matter) and keyword ``kwargs`` (constexprs,
    ``num_warps``, ``num_stages``). ``variant`` names it in reports."""

    kernel: Any
    variant: str
    args: tuple
    kwargs: dict


def target_of(arch: str) -> GPUTarget:
    """``GPUTarget`` of an arch name: ``sm_86`` -> cuda 86 (warp 32), ``gfx90a`` -> hip (wave 64)."""
    if arch.startswith("sm_"):
        return GPUTarget("cuda", int(arch[3:]), 32)
    return GPUTarget("hip", arch, 64)


def jit_function(kernel) -> JITFunction:
    """The ``JITFunction`` behind ``kernel``; under ``TRITON_INTERPRET=1`` (an
    ``InterpretedFunction``) rebuilt from the same function and decorator arguments."""
    return kernel if isinstance(kernel, JITFunction) else _rebuilt(kernel)


# Keyed by the Python function: hashing a JITFunction hashes its source and dependencies,
# which fails when they are InterpretedFunctions.
_REBUILT: dict = {}
_BINDERS: dict = {}


def _rebuilt(kernel) -> JITFunction:
    if kernel.fn not in _REBUILT:
        _REBUILT[kernel.fn] = JITFunction(kernel.fn, **kernel.kwargs)
    return _REBUILT[kernel.fn]


def _binder(fn: JITFunction, arch: str):
    if (fn.fn, arch) not in _BINDERS:
        backend = make_backend(target_of(arch))
        _BINDERS[fn.fn, arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    return _BINDERS[fn.fn, arch]


def _bind(call: KernelCall, arch: str):
    fn = jit_function(call.kernel)
    backend, binder = _binder(fn, arch)
    # JITFunction.run adds these two options before binding.
    kwargs = dict(call.kwargs, debug=call.kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound_args, specialization, options = binder(*call.args, **kwargs)
    return fn, backend, kwargs, bound_args, specialization, options


def specialization_key(call: KernelCall, arch: str = "sm_90") -> tuple:
    """The JIT's cache key of ``call`` (kernel, specialization, options): two launches with
    equal keys share one compiled binary."""
    fn, _, _, _, specialization, options = _bind(call, arch)
    return fn.fn.__qualname__, repr(specialization), repr(sorted(options.items()))


def compile_call(call: KernelCall, arch: str):
    """``triton.compile`` of ``call`` for ``arch`` with the JIT's signature, constexprs,
    alignment / divisibility attributes and options."""
    fn, backend, kwargs, bound_args, specialization, options = _bind(call, arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target_of(arch),
                          options=options.__dict__)
