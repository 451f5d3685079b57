"""Row ops (``dynenc/ops/rows.py``): gated_residual_scatter (+ backward), gather_rows, scatter_rows."""
import pytest
import torch
from op_testing import (ATOL, DEVICE, EXACT, REDUCED, SEEDS, TRITON_DTYPES, TRITON_TOLERANCES, AutogradChecks, BadCall,
                        assert_close, assert_close_float64, assert_every_row_written, assert_rejected,
                        bad_call_params, float64_leaves, float64_sample, generator, launcher, long_batch, randint,
                        randn, reference_grads)

from dynenc.ops.rows import reference_gated_residual_scatter, reference_gather_rows, reference_scatter_rows

ops = torch.ops.dynenc


# ----------------------------------------------------------------------------- C++ vs reference
def active_rows(gen, case, num_rows):
    """(index or None, M): all rows, no rows, a random distinct subset, or a prefix."""
    kind = case % 4
    m = num_rows if kind == 0 else 0 if kind == 1 else randint(gen, 0, num_rows)
    if kind == 3:
        return None, m
    return torch.randperm(num_rows, generator=gen)[:m], m


def random_gate(gen, case, m, dtype):
    """None, hard 0/1 or soft."""
    kind = (case // 4) % 3
    if kind == 0:
        return None
    gate = torch.rand(m, generator=gen, dtype=torch.float64)
    return (gate.round() if kind == 1 else gate).to(dtype)


def gated_case(seed, dtype):
    gen = generator(seed)
    n, d = randint(gen, 0, 24), randint(gen, 1, 19)
    index, m = active_rows(gen, seed, n)
    return randn(gen, n, d, dtype=dtype), randn(gen, m, d, dtype=dtype), random_gate(gen, seed, m, dtype), index


def to_float64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_cpp_gated_residual_scatter(dtype, seed):
    x, y, gate, index = gated_case(seed, dtype)
    assert_close("out", reference_gated_residual_scatter(x, y, gate, index),
                 ops.gated_residual_scatter(x, y, gate, index), ATOL[dtype])

    grad_out = randn(generator(seed + 1), *x.shape, dtype=dtype)
    expected = reference_grads(lambda *t: reference_gated_residual_scatter(*t, index), (x, y, gate), grad_out)
    if gate is None:  # the C++ op always returns grad_gate, zeros without a gate
        expected[2] = torch.zeros(y.shape[0], dtype=dtype)
    actual = ops.gated_residual_scatter_backward(grad_out, x, y, gate, index)
    for name, e, a in zip(("grad_x", "grad_y", "grad_gate"), expected, actual):
        assert_close(name, e, a, ATOL[dtype])


@pytest.mark.parametrize("seed", SEEDS[::4])
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_cpp_gated_residual_scatter_reduced(dtype, seed):
    x, y, gate, index = gated_case(seed, dtype)
    expected = reference_gated_residual_scatter(to_float64(x), to_float64(y), to_float64(gate), index)
    assert_close("out", expected, ops.gated_residual_scatter(x, y, gate, index).double(), 2e-2, rtol=1e-2)


def test_cpp_gated_residual_scatter_gate_dtype():
    """A float32 gate on bfloat16 rows is cast like the reference does; grad_gate keeps float32."""
    gen = generator(0)
    x, y = randn(gen, 9, 5, dtype=torch.bfloat16), randn(gen, 4, 5, dtype=torch.bfloat16)
    gate, index = torch.rand(4, generator=gen), torch.tensor([7, 0, 3, 5])
    assert_close("out", reference_gated_residual_scatter(x, y, gate, index),
                 ops.gated_residual_scatter(x, y, gate, index), 1e-2)
    grad_gate = ops.gated_residual_scatter_backward(torch.ones_like(x), x, y, gate, index)[2]
    assert grad_gate.dtype == torch.float32


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", EXACT + REDUCED, ids=str)
def test_cpp_gather_rows(dtype, seed):
    gen = generator(seed)
    n, d = randint(gen, 0, 24), randint(gen, 1, 19)
    x = randn(gen, n, d, dtype=dtype)
    m = randint(gen, 0, 30) if n else 0
    index = torch.randint(0, max(n, 1), (m,), generator=gen)  # duplicates are fine for a gather
    assert torch.equal(ops.gather_rows(x, index), reference_gather_rows(x, index))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", EXACT + REDUCED, ids=str)
def test_cpp_scatter_rows(dtype, seed):
    gen = generator(seed)
    n, d = randint(gen, 0, 24), randint(gen, 1, 19)
    index, m = active_rows(gen, seed, n)
    if index is None:
        index = torch.arange(m)
    y = randn(gen, m, d, dtype=dtype)
    assert torch.equal(ops.scatter_rows(y, index, n), reference_scatter_rows(y, index, n))


LONG_X, LONG_Y, LONG_INDEX, LONG_GATE, _ = long_batch()
WRITTEN = {
    "gated_residual_scatter": (lambda: ops.gated_residual_scatter(LONG_X, LONG_Y, LONG_GATE, LONG_INDEX),
                               lambda: reference_gated_residual_scatter(LONG_X, LONG_Y, LONG_GATE, LONG_INDEX)),
    "gated_residual_scatter_prefix": (lambda: ops.gated_residual_scatter(LONG_X, LONG_Y, None, None),
                                      lambda: reference_gated_residual_scatter(LONG_X, LONG_Y, None, None)),
    "gated_residual_scatter_backward": (
        lambda: ops.gated_residual_scatter_backward(LONG_X, LONG_X, LONG_Y, LONG_GATE, LONG_INDEX)[0],
        lambda: torch.where(torch.isin(torch.arange(300), LONG_INDEX)[:, None], torch.zeros(()), LONG_X).index_copy(
            0, LONG_INDEX, LONG_X[LONG_INDEX] * (1 - LONG_GATE)[:, None])),
    "scatter_rows": (lambda: ops.scatter_rows(LONG_Y, LONG_INDEX, 300),
                     lambda: reference_scatter_rows(LONG_Y, LONG_INDEX, 300)),
}


@pytest.mark.parametrize("name", list(WRITTEN))
def test_cpp_every_output_row_written(name):
    assert_every_row_written(name, *WRITTEN[name], numel=LONG_X.numel())


def test_cpp_non_contiguous_inputs():
    gen = generator(5)
    x = randn(gen, 33, 20)[:, ::2]
    y, index = randn(gen, 10, 20)[:, 1::2], torch.randperm(33, generator=gen)[:20][::2]
    gate = torch.rand(20, generator=gen)[::2]
    assert_close("gated_residual_scatter", reference_gated_residual_scatter(x, y, gate, index),
                 ops.gated_residual_scatter(x, y, gate, index), 1e-5)
    assert torch.equal(ops.gather_rows(x, index), reference_gather_rows(x, index))


# ----------------------------------------------------------------------------- Triton vs reference
# (N, D, M, index kind): odd D; D > 512 loops over two BLOCK_D chunks; all / no rows active.
ROW_CASES = [(37, 13, 11, "random"), (20, 600, 7, "random"), (9, 5, 9, "random"), (9, 5, 0, "random"),
             (16, 3, 6, "prefix"), (1, 1, 1, "prefix"), (4, 3, 0, "prefix")]


def row_inputs(case, dtype, gate_kind, seed=0):
    num_rows, dim, num_active, index_kind = case
    gen = generator(seed)
    x, y = (randn(gen, rows, dim, dtype=dtype, device=DEVICE) for rows in (num_rows, num_active))
    index = None if index_kind == "prefix" else torch.randperm(num_rows, generator=gen)[:num_active].to(DEVICE)
    gate = {
        "none": None,
        "soft": torch.rand(num_active, generator=gen).to(dtype),
        "hard": (torch.rand(num_active, generator=gen) > 0.5).to(dtype),
        "soft_fp32": torch.rand(num_active, generator=gen),  # rounded to x's dtype by the op
    }[gate_kind]
    return x, y, None if gate is None else gate.to(DEVICE), index


def cpu(index):
    return None if index is None else index.cpu()


@pytest.mark.parametrize("gate_kind", ["soft", "hard", "soft_fp32", "none"])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: "N{}-D{}-M{}-{}".format(*c))
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_gated_residual_scatter(dtype, case, gate_kind):
    x, y, gate, index = row_inputs(case, dtype, gate_kind)
    out = launcher("gated_residual_scatter")(x, y, gate, index)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = reference_gated_residual_scatter(*float64_leaves(x, y, gate), cpu(index))
    assert_close_float64("out", expected, out, TRITON_TOLERANCES[dtype])


@pytest.mark.parametrize("gate_kind", ["soft", "soft_fp32", "none"])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: "N{}-D{}-M{}-{}".format(*c))
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_gated_residual_scatter_backward(dtype, case, gate_kind):
    x, y, gate, index = row_inputs(case, dtype, gate_kind)
    grad_out = randn(generator(1), *x.shape, dtype=dtype, device=DEVICE)
    grad_x, grad_y, grad_gate = launcher("gated_residual_scatter_backward")(grad_out, x, y, gate, index)
    expected = reference_grads(lambda *t: reference_gated_residual_scatter(*t, cpu(index)), float64_leaves(x, y, gate),
                               grad_out.cpu().double())
    assert_close_float64("grad_x", expected[0], grad_x, TRITON_TOLERANCES[dtype])
    assert_close_float64("grad_y", expected[1], grad_y, TRITON_TOLERANCES[dtype])
    assert grad_gate.shape == (y.shape[0],)
    if gate is None:
        assert grad_gate.dtype == x.dtype and not grad_gate.any()
    else:
        assert grad_gate.dtype == gate.dtype  # reduced in opmath, rounded to the gate's dtype
        tolerance = max(TRITON_TOLERANCES[dtype], TRITON_TOLERANCES[gate.dtype], key=lambda t: t["atol"])
        assert_close_float64("grad_gate", expected[2], grad_gate, tolerance)


@pytest.mark.parametrize("case", [c for c in ROW_CASES if c[3] == "random"], ids=lambda c: "N{}-D{}-M{}".format(*c[:3]))
@pytest.mark.parametrize("dtype", TRITON_DTYPES + [torch.int64], ids=str)  # exact copies: any dtype
def test_triton_gather_scatter_rows(dtype, case):
    x, y, _, index = row_inputs(case, dtype, "none")
    assert torch.equal(launcher("gather_rows")(x, index).cpu(), reference_gather_rows(x.cpu(), index.cpu()))
    num_rows = x.shape[0]
    assert torch.equal(launcher("scatter_rows")(y, index, num_rows).cpu(),
                       reference_scatter_rows(y.cpu(), index.cpu(), num_rows))


# ----------------------------------------------------------------------------- registered autograd
def autograd_samples():
    gen, _, x, index = float64_sample(0)
    y = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    gate = torch.rand(6, dtype=torch.float64, generator=gen, requires_grad=True)
    x.requires_grad_()
    return {
        "gated_residual_scatter": [(x, y, gate, index), (x, y, None, None), (x, y, gate, None)],
        "gather_rows": [(x, index)],
        "scatter_rows": [(y, index, 11)],
    }


class TestAutograd(AutogradChecks):
    samples = autograd_samples()

    @staticmethod
    def double_backward_refused(name, args):
        """A soft gate's backward is the gated_residual_scatter_backward op; a hard gate's and
        gather / scatter's are the row ops themselves (differentiable)."""
        return name == "gated_residual_scatter" and args[2] is not None


# ----------------------------------------------------------------------------- bad inputs
_X, _Y = torch.randn(8, 4), torch.randn(3, 4)
BAD_CALLS = {
    "gated index too large": BadCall("gated_residual_scatter", (_X, _Y, None, torch.tensor([0, 8, 1])),
                                     ValueError, "index", value=True),
    "gated index negative": BadCall("gated_residual_scatter", (_X, _Y, None, torch.tensor([0, -1, 1])),
                                    ValueError, "index", value=True),
    "gated index duplicate": BadCall("gated_residual_scatter", (_X, _Y, None, torch.tensor([2, 5, 2])),
                                     ValueError, "index", value=True),
    "gated index int32": BadCall("gated_residual_scatter", (_X, _Y, None, torch.tensor([0, 1, 2], dtype=torch.int32)),
                                 TypeError, "index"),
    "gated index length": BadCall("gated_residual_scatter", (_X, _Y, None, torch.tensor([0, 1])), ValueError, "index"),
    "gated gate shape": BadCall("gated_residual_scatter", (_X, _Y, torch.rand(4), None), ValueError, "gate"),
    "gated y columns": BadCall("gated_residual_scatter", (_X, torch.randn(3, 5), None, None), ValueError, "y"),
    "gated y dtype": BadCall("gated_residual_scatter", (_X, _Y.double(), None, None), TypeError, "y"),
    "gated prefix too long": BadCall("gated_residual_scatter", (_X, torch.randn(9, 4), None, None), ValueError, "y"),
    "gated backward duplicate": BadCall("gated_residual_scatter_backward", (_X, _X, _Y, None, torch.tensor([1, 1, 2])),
                                        ValueError, "index", value=True),
    "gated backward grad_out": BadCall("gated_residual_scatter_backward", (_Y, _X, _Y, None, None),
                                       ValueError, "grad_out"),
    "gather index too large": BadCall("gather_rows", (_X, torch.tensor([3, 8])), ValueError, "index", value=True),
    "gather index negative": BadCall("gather_rows", (_X, torch.tensor([-1])), ValueError, "index", value=True),
    "gather index int32": BadCall("gather_rows", (_X, torch.tensor([0, 1], dtype=torch.int32)), TypeError, "index"),
    "gather x rank": BadCall("gather_rows", (torch.randn(8), torch.tensor([1])), ValueError, "x"),
    "scatter index too large": BadCall("scatter_rows", (_Y, torch.tensor([0, 1, 8]), 8), ValueError, "index",
                                       value=True),
    "scatter index negative": BadCall("scatter_rows", (_Y, torch.tensor([0, -8, 1]), 8), ValueError, "index",
                                      value=True),
    "scatter index duplicate": BadCall("scatter_rows", (_Y, torch.tensor([4, 1, 4]), 8), ValueError, "index",
                                       value=True),
    "scatter num_rows": BadCall("scatter_rows", (_Y, torch.tensor([0, 1, 2]), -1), ValueError, "num_rows"),
}


@pytest.mark.parametrize("bad,entry", bad_call_params(BAD_CALLS))
def test_bad_inputs_raise(bad, entry):
    assert_rejected(bad, entry)
