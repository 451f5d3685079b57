"""The op table, the backend switch and the registration helpers every op module uses.

:data:`OPS` is the one list of ``dynenc::`` op names. Each op's module name is shared by its
three homes: ``csrc/<module>.cpp`` (schema + CPU kernel), ``kernels/<module>.py`` (Triton
launcher of the same name) and ``dynenc/ops/<module>.py`` (public function, validation,
reference, fake impl, autograd). The tests and the benchmark read the table too.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .. import validation

#: op name -> module name (``csrc/<module>.cpp``, ``kernels/<module>.py``, ``dynenc/ops/<module>.py``).
OPS: Dict[str, str] = {
    "gated_residual_scatter": "rows",
    "gated_residual_scatter_backward": "rows",
    "gather_rows": "rows",
    "scatter_rows": "rows",
    "varlen_dwconv1d": "dwconv",
    "varlen_dwconv1d_backward": "dwconv",
    "varlen_attention": "attention",
    "varlen_attention_backward": "attention",
    "build_plan": "plan",
    "add_layer_norm": "norm",
    "add_layer_norm_backward": "norm",
}

BACKENDS = ("native", "reference")
# Per thread and per asyncio task: a switch in one thread never changes another's forward.
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("dynenc_backend", default="native")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed dynenc ops on backend ``name`` in this thread / context; nests.

    * ``"native"`` (default): ``torch.ops.dynenc.*`` — C++ on CPU tensors, Triton on CUDA
      tensors. There is no silent fallback: a device with no kernel raises.
    * ``"reference"``: each op's plain-PyTorch reference (autograd by torch).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    """The backend of this thread / context (``"native"`` or ``"reference"``)."""
    return _backend.get()


def native() -> bool:
    return _backend.get() == "native"


def dispatch(name: str, reference: Callable, check_values: Callable[..., None], *args):
    """``dynenc::name(*args)`` on the native backend; on the reference backend the op's value
    checks (which the C++ kernels make themselves) and then its plain-PyTorch reference."""
    if native():
        return getattr(torch.ops.dynenc, name)(*args)
    if validation.values_need_checking():
        check_values(*args)
    return reference(*args)


#: op name -> the CUDA kernel registered for it (the launcher behind its checks).
CUDA_KERNELS: Dict[str, Callable] = {}


def register_cuda(name: str, check: Callable[..., None], check_values: Optional[Callable[..., None]] = None) -> None:
    """Register ``kernels/<module>.py``'s launcher ``name`` as the CUDA kernel of ``dynenc::name``.

    The launchers trust their arguments, so ``check`` (shapes, dtypes, devices; no sync) runs
    first, and ``check_values`` (index ranges, ``cu_seqlens``; one host sync) too unless the
    caller vouches for the values (:func:`dynenc.validation.trusted_inputs`, which the encoder
    uses for the tensors it builds).
    """

    def launch(*args):
        check(*args)
        if check_values is not None and validation.values_need_checking():
            check_values(*args)
        # Imported on the first CUDA call: triton is not needed on CPU.
        kernels = importlib.import_module(f"dynenc.kernels.{OPS[name]}")
        return getattr(kernels, name)(*args)

    CUDA_KERNELS[name] = launch
    torch.library.register_kernel(f"dynenc::{name}", "cuda", launch)


_IMPLS = torch.library.Library("dynenc", "IMPL")


def register_autocast(name: str, policy: str) -> None:
    """Autocast behaviour of ``dynenc::name`` on CPU and CUDA (fp32 accumulation inside every kernel).

    * ``"lower"``: floating inputs are cast to the autocast dtype (bf16 / fp16) — the compute
      ops (attention, depthwise conv), like torch's own matmul-class ops.
    * ``"promote"``: floating inputs are cast to the widest floating dtype among them — the row
      ops, so an fp32 residual stream is never rounded to half precision.
    """
    op = getattr(torch.ops.dynenc, name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, excluded=excluded):
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*autocast_args(policy, device_type, args))

        _IMPLS.impl(name, kernel, key, with_keyset=True)


def autocast_args(policy: str, device_type: str, args: Sequence) -> List:
    """``args`` with floating tensors cast as :func:`register_autocast`'s ``policy`` says."""
    floating = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not floating:
        return list(args)
    if policy == "lower":
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = functools.reduce(torch.promote_types, floating)
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def autocast(policy: str, *args):
    """What the public op functions run first: inside an autocast region of the arguments'
    device, ``args`` cast by ``policy`` (so both backends see what the kernel would); else as is."""
    device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return args
    return autocast_args(policy, device_type, args)


def refuse_double_backward(name: str) -> None:
    """Give the backward op ``dynenc::name`` an autograd formula that refuses to differentiate
    it (``once_differentiable`` semantics): double backward raises instead of silently
    treating the first derivatives as constants."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"dynenc::{name} is not differentiable: double backward (create_graph=True, "
            "gradgradcheck) through dynenc ops is not supported; use dynenc.use_backend('reference')"
        )

    torch.library.register_autograd(f"dynenc::{name}", backward)
