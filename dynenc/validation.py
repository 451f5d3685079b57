"""The one validation layer: argument checks shared by every op, backend and module.

Policy: a wrong Python type or tensor dtype raises ``TypeError``; a wrong shape, device or
value raises ``ValueError``. Every message names the argument, what it got and what was
expected. The C++ kernels follow the same policy (``TORCH_CHECK_TYPE`` / ``TORCH_CHECK_VALUE``).

Shape checks use ``guard_or_false``: under ``torch.compile`` row counts are data-dependent,
and a check that cannot be decided while tracing is left to the kernel's own checks.
Checks of tensor *values* (index ranges, ``cu_seqlens`` order) read the tensor on the host;
they are run where the kernel itself would not catch a bad value.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence, cast

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Set while DynamicConformer runs ops on tensors it built itself (indices, cu_seqlens): their
# values are right by construction, so the CUDA ops skip the value checks (a host sync each).
_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("dynenc_trusted_inputs", default=False)


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Ops called inside skip the host-syncing value checks of their index / cu_seqlens inputs."""
    token = _trusted.set(True)
    try:
        yield
    finally:
        _trusted.reset(token)


def values_need_checking() -> bool:
    """False inside :func:`trusted_inputs` and while a CUDA graph is being captured (no sync allowed)."""
    return not (_trusted.get() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value: Any,
    dim: Optional[int] = None,
    layout: str = "",
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> None:
    """``value`` is a tensor with ``dim`` dimensions (``layout`` names them), one of
    ``dtypes`` and on ``device``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(value.shape)}".replace("  ", " "))
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device}, got {value.device}")


def check_like(name: str, value: Tensor, ref_name: str, ref: Tensor, dims: Sequence[int] = ()) -> None:
    """``value`` has ``ref``'s dtype and device, and its size in each of ``dims``."""
    check_tensor(name, value, dim=ref.dim())
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {value.device}")
    for d in dims:
        if guard_or_false(value.shape[d] != ref.shape[d]):
            raise ValueError(f"{name} must match {ref_name} in dim {d} ({tuple(ref.shape)}), got {tuple(value.shape)}")


def check_index(name: str, index: Tensor, device: torch.device, length: Optional[int] = None) -> None:
    """``index`` is an int64 ``[length]`` row index on ``device``."""
    check_tensor(name, index, dim=1, layout="[rows]", dtypes=(torch.int64,), device=device)
    if length is not None and guard_or_false(index.shape[0] != length):
        raise ValueError(f"{name} must have {length} entries (one per active row), got {index.shape[0]}")


def check_index_values(name: str, index: Tensor, num_rows: int, distinct: bool) -> None:
    """Every entry of ``index`` in ``[0, num_rows)`` (and no row twice when ``distinct``). Host sync."""
    if torch.compiler.is_compiling() or index.numel() == 0:
        return
    extrema = torch.aminmax(index)
    low, high = int(extrema.min), int(extrema.max)
    if low < 0 or high >= num_rows:
        raise ValueError(f"{name} must hold rows in [0, {num_rows}), got values in [{low}, {high}]")
    if distinct and torch.unique(index).numel() != index.numel():
        raise ValueError(f"{name} must hold distinct rows, got a row more than once")


def check_cu_seqlens(cu_seqlens: Tensor, device: torch.device) -> None:
    """``cu_seqlens`` is a non-empty int32 ``[B + 1]`` vector on ``device``."""
    check_tensor("cu_seqlens", cu_seqlens, dim=1, layout="[B + 1]", dtypes=(torch.int32,), device=device)
    if guard_or_false(cu_seqlens.shape[0] < 1):
        raise ValueError("cu_seqlens must have B + 1 >= 1 entries, got 0")


def check_cu_seqlens_values(cu_seqlens: Tensor, num_rows: int, max_seqlen: Optional[int] = None) -> None:
    """``cu_seqlens`` starts at 0, never decreases, ends at ``num_rows`` (and no sequence is
    longer than ``max_seqlen``). Host sync."""
    if torch.compiler.is_compiling():
        return
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or any(n < 0 for n in lengths) or bounds[-1] != num_rows:
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at the number of rows {num_rows}, "
            f"got {bounds if len(bounds) <= 8 else bounds[:4] + ['...'] + bounds[-4:]}"
        )
    if max_seqlen is not None and lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen must be >= the longest sequence ({max(lengths)}), got {max_seqlen}")


def check_real(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """``value`` is a finite real number (int or float, not bool) in ``[low, high]``; returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must {_bounds(low, high)}, got {value}")
    return value


def check_int(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` is an int (not bool; a SymInt while tracing) in ``[low, high]``; returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if guard_or_false((low is not None and value < low) or (high is not None and value > high)):
        raise ValueError(f"{name} must {_bounds(low, high)}, got {value}")
    return cast(int, value)  # a SymInt stands in for an int while tracing


def device_memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: physical RAM for the CPU, the card's total for CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_allocation(name: str, count: Any, bytes_each: int, device: torch.device) -> None:
    """``count`` items of ``bytes_each`` bytes fit ``device``'s memory: a size no machine can
    hold is a ``ValueError`` naming ``name`` and the byte count, not an allocator crash."""
    if torch.compiler.is_compiling():  # sizes are symbolic there; the eager call checked them
        return
    needed, available = count * bytes_each, device_memory_bytes(device)
    if needed > available:
        raise ValueError(
            f"{name}={count} needs {needed:,} bytes ({count} x {bytes_each} B), more than the "
            f"{available:,} bytes of {device}"
        )


def check_device(name: str, device: Any) -> torch.device:
    """``device`` as a ``torch.device`` if it is a CPU or an available CUDA device.

    Raises:
        ValueError: not a device string, not cpu/cuda, or CUDA asked for without a GPU
            (``name`` named).
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:N]', got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {device!r} requested but CUDA is not available")
    return parsed


def _bounds(low: Optional[float], high: Optional[float]) -> str:
    if high is None:
        return f"be >= {low}"
    return f"be <= {high}" if low is None else f"lie in [{low}, {high}]"


def _constant(message: str) -> Callable[[], str]:
    """A message callback for ``torch._check`` (bound now, not to a loop variable)."""
    return lambda: message


def check_range(ranges: Sequence[tuple]) -> None:
    """``low <= values <= high`` for each ``(name, values, low, high, high_name)``, with one host
    sync for all of them (a runtime assertion while compiling: the values are data-dependent)."""
    if torch.compiler.is_compiling():
        for name, values, low, high, high_name in ranges:
            message = f"{name} must lie in [{low}, {high_name}={high}]"
            torch._check(values.min().item() >= low, _constant(message))
            torch._check(values.max().item() <= high, _constant(message))
        return
    found = torch.stack(
        [e.to(torch.int64) for _, values, _, _, _ in ranges for e in (values.min(), values.max())]
    ).tolist()
    for (name, _, low, high, high_name), lo, hi in zip(ranges, found[::2], found[1::2]):
        _check_found_range(name, lo, hi, low, high, high_name)


def _check_found_range(name: str, lo: int, hi: int, low: int, high: int, high_name: str) -> None:
    if lo < low or hi > high:
        raise ValueError(f"{name} must lie in [{low}, {high_name}={high}], got min {lo} max {hi}")


def integer_lengths(lengths: Tensor) -> Tensor:
    """int64 valid-frame counts from integer or floating ``lengths``, as torchaudio reads them:
    frame t is valid iff ``t < lengths[b]``, so a floating length counts ``ceil`` frames."""
    return (lengths.ceil() if lengths.is_floating_point() else lengths).to(torch.int64)


def check_encoder_inputs(
    input: Any,
    lengths: Any,
    input_dim: int,
    num_layers: int,
    weight_dtype: torch.dtype,
    layer_mask: Any = None,
    depth: Any = None,
    gates: Any = None,
    policy: Any = None,
) -> Tensor:
    """The arguments of ``DynamicConformer.forward`` (see its docstring): kinds, shapes, dtypes
    and devices, without reading a value on the host. The value ranges (lengths, depth) are
    checked by :func:`check_host_ranges` on the values the forward reads anyway
    (:func:`dynenc.routing.read_host_inputs`), or, while compiling, by runtime assertions.

    Returns the valid-frame counts as int64 ``[B]`` (:func:`integer_lengths`)."""
    check_tensor("input", input, dim=3, layout=f"[B, T, {input_dim}]")
    if input.device.type == "meta":
        raise ValueError(
            "input is on the meta device: the packed forward sizes its rows and routes from the values of lengths "
            "(and depth / layer_mask), which meta tensors do not hold; for shapes without data trace it with "
            "FakeTensors (torch.compile, torch.export) or run dynenc.padded.PaddedConformer(model) on meta"
        )
    if input.shape[2] != input_dim:
        raise ValueError(f"input must be a [B, T, {input_dim}] tensor, got {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    autocast = input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type)
    if input.dtype != weight_dtype and not autocast:
        raise TypeError(
            f"input must have the model's dtype {weight_dtype} (convert it with .to({weight_dtype}) or the "
            f"model with .to({input.dtype}), or run under torch.autocast), got {input.dtype}"
        )
    batch_size, max_frames = input.shape[:2]
    if batch_size == 0 or max_frames == 0:
        raise ValueError(f"input must have at least one sample and one frame, got shape {tuple(input.shape)}")
    check_tensor("lengths", lengths, device=input.device)
    if lengths.dim() != 1 or lengths.shape[0] != batch_size:
        raise ValueError(f"lengths must be a 1-D tensor of {batch_size} lengths, got {tuple(lengths.shape)}")
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be an integer or floating tensor, got {lengths.dtype}")
    if layer_mask is not None and depth is not None:
        raise ValueError("pass at most one of layer_mask and depth")
    if layer_mask is not None:
        check_tensor("layer_mask", layer_mask, dtypes=(torch.bool,), device=input.device)
        if tuple(layer_mask.shape) != (batch_size, num_layers):
            raise ValueError(
                f"layer_mask must be a bool tensor of shape ({batch_size}, {num_layers}), got {tuple(layer_mask.shape)}"
            )
    if depth is not None:
        check_tensor("depth", depth, device=input.device)
        if depth.is_floating_point() or depth.dtype == torch.bool or tuple(depth.shape) != (batch_size,):
            raise ValueError(
                f"depth must be an integer tensor of shape ({batch_size},), got {depth.dtype} {tuple(depth.shape)}"
            )
    if gates is not None:
        check_tensor("gates", gates, device=input.device)
        if tuple(gates.shape) != (batch_size, num_layers) or not gates.is_floating_point():
            raise ValueError(
                f"gates must be a float tensor of shape ({batch_size}, {num_layers}), got "
                f"{gates.dtype} {tuple(gates.shape)}"
            )
    if policy is not None and not (
        isinstance(getattr(policy, "decision_layers", None), tuple) and callable(getattr(policy, "decide", None))
    ):
        raise TypeError(
            f"policy must be a routing policy (a tuple decision_layers and a decide(layer, x, schedule) "
            f"method), got {type(policy).__name__}"
        )
    frames = integer_lengths(lengths)
    if torch.compiler.is_compiling():
        ranges = [("lengths", frames, 0, max_frames, "T")]
        if depth is not None:
            ranges.append(("depth", depth, 0, num_layers, "num_layers"))
        check_range(ranges)
    return frames


def check_host_ranges(lengths: Sequence[int], depth: Optional[Sequence[int]], max_frames: int, num_layers: int) -> None:
    """``0 <= lengths <= T`` and ``0 <= depth <= num_layers`` on host copies of the forward's
    inputs (no sync of its own)."""
    _check_found_range("lengths", min(lengths), max(lengths), 0, max_frames, "T")
    if depth is not None:
        _check_found_range("depth", min(depth), max(depth), 0, num_layers, "num_layers")
