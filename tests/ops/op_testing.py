"""Shared case generators and assertions of the op tests (``tests/ops/test_<module>.py``).

A plain module, not a ``conftest.py``: every ``conftest.py`` outside a package is imported as
``conftest``, so helpers shared across folders live in plain modules (this one,
``tests/conformer_pairs.py``).

Three ways an op is run against its plain-PyTorch reference (``dynenc.ops.<module>.reference_<op>``):

* C++ (``torch.ops.dynenc.<op>`` on CPU tensors) over :data:`SEEDS` ragged cases;
* the Triton launcher (:func:`launcher`): compiled on a GPU, else on CPU tensors in the Triton
  interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported);
* the public function ``dynenc.ops.<op>`` through its registered autograd (float64 samples).
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, NamedTuple, Optional, Sequence

import pytest
import torch
from torch import Tensor

import dynenc
from dynenc.ops import MODULES, OPS

CASES = 200
SEEDS = [pytest.param(seed, id=f"seed{seed}") for seed in range(CASES)]
EXACT = [torch.float32, torch.float64]
REDUCED = [torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# The interpreter runs on numpy, which has no bfloat16.
TRITON_DTYPES = [torch.float32, torch.float16, torch.float64] + ([] if INTERPRETED else [torch.bfloat16])
TRITON_TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# Many short sequences, empty ones included: exercises the bisection over cu_seqlens.
MANY_LENGTHS = (0, 3, 6, 1, 0, 5, 2, 2, 0, 4, 6, 1, 3, 0, 0, 5, 1, 2, 6, 3, 4, 0, 1, 2, 5)


# ----------------------------------------------------------------------------- random cases
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randint(gen, low: int, high: int) -> int:
    """Uniform int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def randn(gen, *shape, dtype=torch.float32, device="cpu") -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def ragged_cu_seqlens(gen, case: int) -> Tensor:
    """Ragged int32 cu_seqlens cycling through the edge cases: B = 1, all T = 1, zero-length
    sequences (also leading / trailing), an all-empty batch, and random mixes."""
    kind = case % 5
    batch = 1 if kind == 0 else randint(gen, 1, 6)
    if kind == 1:
        lengths = torch.ones(batch, dtype=torch.int64)
    elif kind == 2:
        lengths = torch.zeros(batch, dtype=torch.int64)
    else:
        lengths = torch.randint(0, 9, (batch,), generator=gen)
        if kind == 3:
            lengths[torch.rand(batch, generator=gen) < 0.4] = 0
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)


def cu_seqlens_of(lengths: Sequence[int], device=DEVICE) -> Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def batch_id(lengths: Sequence[int]) -> str:
    return f"B{len(lengths)}-N{sum(lengths)}-min{min(lengths)}"


def float64_sample(seed: int, num_rows: int = 11, dim: int = 5, lengths=(4, 0, 6, 1)):
    """(generator, cu_seqlens, x, sorted distinct index of 6 rows): the small float64 ragged
    batch of the opcheck / gradcheck samples."""
    gen = generator(seed)
    cu_seqlens = cu_seqlens_of(lengths, "cpu")
    assert cu_seqlens[-1] == num_rows
    x = torch.randn(num_rows, dim, dtype=torch.float64, generator=gen)
    index = torch.randperm(num_rows, generator=gen)[:6].sort().values
    return gen, cu_seqlens, x, index


def long_batch():
    """(x [300, 33], y [120, 33], index [120], gate [120], cu_seqlens with empty sequences):
    rows enough for several blocks / threads of every kernel."""
    gen = generator(3)
    x, y = randn(gen, 300, 33), randn(gen, 120, 33)
    index = torch.randperm(300, generator=gen)[:120]
    gate = torch.rand(120, generator=gen)
    return x, y, index, gate, torch.tensor([0, 0, 100, 101, 250, 250, 300], dtype=torch.int32)


# ----------------------------------------------------------------------------- comparisons
def assert_close(name: str, expected: Tensor, actual: Tensor, atol: float, rtol: float = 0.0) -> None:
    """``actual`` equals ``expected`` (cast to its dtype, moved to its device); the failure names ``name``."""
    expected = expected.to(device=actual.device, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_close_float64(name: str, expected: Tensor, actual: Tensor, tolerance: dict) -> None:
    """Compare on the CPU in float64; NaN (an unwritten ``torch.empty`` row) never matches."""
    assert_close(name, expected.detach().double(), actual.detach().cpu().double(), **tolerance)


def float64_leaves(*tensors: Optional[Tensor]) -> list:
    """CPU float64 copies that require grad (None stays None)."""
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in tensors]


def reference_grads(fn: Callable, inputs: Sequence[Optional[Tensor]], grad_out: Tensor) -> list:
    """Gradients of ``fn(*inputs)`` w.r.t. fresh leaf copies of the tensors of ``inputs``:
    None for a None input, zeros for an input the output does not depend on (e.g. attention
    over an all-empty batch builds no graph)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    used = [t for t in leaves if t is not None]
    out = fn(*leaves)
    if out.requires_grad:
        grads = torch.autograd.grad(out, used, grad_out.to(out.dtype), materialize_grads=True)
    else:
        grads = [torch.zeros_like(t) for t in used]
    grads = iter(grads)
    return [None if t is None else next(grads) for t in leaves]


def poison_freed_memory(numel: int) -> None:
    """Leaves freed NaN memory behind, so an output row a C++ kernel forgets to write is NaN.
    Several blocks, so the kernel's small allocations (index masks) cannot use up all of it."""
    junk = [torch.full((numel,), float("nan")) for _ in range(8)]
    del junk


def assert_every_row_written(name: str, op: Callable[[], Tensor], oracle: Callable[[], Tensor], numel: int) -> None:
    """``op()`` (of ``numel`` output elements, run on NaN-poisoned memory) writes every row and matches ``oracle()``."""
    poison_freed_memory(numel)
    out = op()
    assert torch.isfinite(out).all(), f"{name}: rows left unwritten"
    assert_close(name, oracle(), out, 1e-5)


# ----------------------------------------------------------------------------- Triton launchers
@contextlib.contextmanager
def _nan_filled_empty():
    """torch.empty returns NaN (floats) / max int while deterministic algorithms are on, so a
    row a kernel forgets to write fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def launcher(name: str) -> Callable:
    """The Triton launcher of op ``name``, run with NaN-filled ``torch.empty``. Skips the test
    without triton, or when its kernels can neither run compiled (no GPU) nor interpreted."""
    kernels = pytest.importorskip("dynenc.kernels")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernels._utils._inverse_index_kernel, InterpretedFunction) and not torch.cuda.is_available():
        pytest.skip("dynenc.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels are "
                    "compiled-only and there is no GPU: run this file on its own")
    launch = kernels.launcher(name)

    def run(*args):
        with _nan_filled_empty():
            return launch(*args)

    return run


# ----------------------------------------------------------------------------- registered autograd
def tensor_arguments(name: str, args: Sequence) -> list:
    """``[(argument name, tensor)]`` of the arguments of op ``name`` that require grad."""
    schema = getattr(torch.ops.dynenc, name).default._schema
    return [(a.name, v) for a, v in zip(schema.arguments, args) if isinstance(v, Tensor) and v.requires_grad]


def leading_outputs(fn: Callable, count: int = 1) -> Callable:
    """``fn`` returning its first ``count`` outputs only (the differentiable ones of an op
    whose further outputs are statistics for its backward, e.g. a logsumexp)."""
    def call(*args):
        out = fn(*args)
        if not isinstance(out, tuple):
            return out
        return out[0] if count == 1 else out[:count]

    return call


def as_outputs(out) -> tuple:
    """A public function's result as a tuple of tensors (most return one tensor)."""
    return out if isinstance(out, tuple) else (out,)


class AutogradChecks:
    """The registered autograd of differentiable ops, on small float64 samples. An op file
    subclasses it as ``TestAutograd``, setting ``samples`` (``{op name: [args, ...]}``, the
    floating tensors requiring grad) and ``double_backward_refused(name, args)``: whether the
    native backward is a ``*_backward`` op, which refuses double backward; ``outputs``
    (``{op name: count}``, default 1): how many leading outputs of the op are differentiable."""

    samples: dict = {}
    outputs: dict = {}

    @staticmethod
    def double_backward_refused(name: str, args: Sequence) -> bool:
        raise NotImplementedError

    def pytest_generate_tests(self, metafunc):
        params = [pytest.param(name, args, id=f"{name}-{i}") for name, cases in self.samples.items()
                  for i, args in enumerate(cases)]
        metafunc.parametrize("name,args", params)

    def test_opcheck(self, name, args):
        torch.library.opcheck(getattr(torch.ops.dynenc, name).default, args)

    def test_gradcheck_through_registered_autograd(self, name, args):
        op = leading_outputs(getattr(torch.ops.dynenc, name), self.outputs.get(name, 1))
        assert torch.autograd.gradcheck(op, args, atol=1e-6)

    def test_native_backward_matches_reference_autograd(self, name, args):
        """The registered autograd (the C++ ``*_backward`` ops) gives the reference's autograd gradients."""
        inputs = tensor_arguments(name, args)
        grads = {}
        for backend in ("native", "reference"):
            with dynenc.use_backend(backend):
                outs = as_outputs(getattr(dynenc.ops, name)(*args))
            grads[backend] = torch.autograd.grad(outs, [t for _, t in inputs], [torch.ones_like(o) for o in outs])
        for (arg, _), reference, native in zip(inputs, grads["reference"], grads["native"]):
            assert_close(f"grad_{arg}", reference, native, atol=1e-10, rtol=1e-10)

    def test_double_backward(self, name, args):
        """Native double backward either raises (the backward is a ``*_backward`` op) or passes
        gradgradcheck (the backward is made of differentiable ops); on the reference backend
        it always passes gradgradcheck."""
        public = getattr(dynenc.ops, name)
        refused = self.double_backward_refused(name, args)
        if refused:
            inputs = [t for _, t in tensor_arguments(name, args)]
            outs = as_outputs(public(*args))
            grads = torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], create_graph=True)
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(sum(g.sum() for g in grads), inputs, allow_unused=True)
        for backend in ("reference",) if refused else ("native", "reference"):
            with dynenc.use_backend(backend):
                assert torch.autograd.gradgradcheck(public, tuple(args), atol=1e-6, fast_mode=True), backend


# ----------------------------------------------------------------------------- bad inputs
class BadCall(NamedTuple):
    """A call of op ``op`` with ``args`` that must raise ``error`` naming ``argument``.
    ``value``: a bad tensor value (index range, cu_seqlens order): caught by the C++ kernels and
    the reference backend's value checks, not by ``check_<op>`` (which reads no values)."""

    op: str
    args: tuple
    error: type
    argument: str
    value: bool = False


def entry_points(bad: BadCall) -> list:
    """Where the call is made: the C++ op directly, the public function on each backend
    (forward ops), and ``check_<op>``, which the CUDA registration runs before a launch."""
    public = [] if bad.op.endswith("_backward") else ["native", "reference"]
    return ["torch.ops", *public] + ([] if bad.value else ["check"])


def bad_call_params(table: dict) -> list:
    return [pytest.param(bad, entry, id=f"{case}-{entry}")
            for case, bad in table.items() for entry in entry_points(bad)]


def assert_rejected(bad: BadCall, entry: str) -> None:
    with pytest.raises(bad.error, match=rf"\b{re.escape(bad.argument)}\b"):
        if entry == "torch.ops":
            getattr(torch.ops.dynenc, bad.op)(*bad.args)
        elif entry == "check":
            getattr(MODULES[OPS[bad.op]], f"check_{bad.op}")(*bad.args)
        else:
            with dynenc.use_backend(entry):
                getattr(dynenc.ops, bad.op)(*bad.args)
