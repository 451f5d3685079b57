"""Residual add + LayerNorm (``dynenc/ops/norm.py``): add_layer_norm (+ backward)."""
import pytest
import torch
from op_testing import (ATOL, DEVICE, EXACT, REDUCED, SEEDS, TRITON_DTYPES, TRITON_TOLERANCES, AutogradChecks, BadCall,
                        assert_close, assert_close_float64, assert_every_row_written, assert_rejected,
                        bad_call_params, float64_leaves, generator, launcher, long_batch, randint, randn)

import dynenc
from dynenc.ops import norm as norm_module
from dynenc.ops.norm import reference_add_layer_norm

ops = torch.ops.dynenc
# Exact in fp32 (the Triton kernels take alpha as an fp32 argument, like attention's scale).
ALPHAS = (1.0, 0.5, -2.0, 0.25)
GRAD_NAMES = ("grad_x", "grad_residual", "grad_weight", "grad_bias")


def reference_stats(total, eps):
    """float64 ``(mean, rstd)`` of the rows of ``total``."""
    total = total.double()
    mean = total.mean(1)
    return mean, torch.rsqrt((total - mean[:, None]).square().mean(1) + eps)


def reference_backward(x, residual, alpha, weight, bias, eps, grad_out, grad_sum):
    """float64 ``{name: gradient}`` of ``(sum, normed)`` with cotangents ``(grad_sum or 0, grad_out)``.
    A missing weight / bias is a leaf of ones / zeros (same forward), so the op's gradients
    for the unit weight and zero bias are checked too."""
    dim = x.shape[1]
    weight = torch.ones(dim, dtype=torch.float64) if weight is None else weight
    bias = torch.zeros(dim, dtype=torch.float64) if bias is None else bias
    leaves = float64_leaves(x, residual, weight, bias)
    total, normed = reference_add_layer_norm(leaves[0], leaves[1], alpha, leaves[2], leaves[3], eps)
    cotangents = (torch.zeros_like(total) if grad_sum is None else grad_sum.cpu().double(), grad_out.cpu().double())
    return dict(zip(GRAD_NAMES, torch.autograd.grad((total, normed), leaves, cotangents)))


# ----------------------------------------------------------------------------- C++ vs reference
def norm_case(seed, dtype, device="cpu"):
    """(x, residual, alpha, weight, bias, eps): ragged N in [0, 24] (0 included), D in [1, 40]
    (the vectorised 8-lane loops and their tails), affine parameters both / weight / none."""
    gen = generator(seed)
    n, d = randint(gen, 0, 24), randint(gen, 1, 40)
    if seed % 7 == 0:
        n = 0
    x, residual = (randn(gen, n, d, dtype=dtype, device=device) for _ in range(2))
    kind = seed % 3
    weight = None if kind == 2 else (1 + 0.3 * randn(gen, d)).to(dtype).to(device)
    bias = None if kind != 0 else (0.3 * randn(gen, d)).to(dtype).to(device)
    return x, residual, ALPHAS[seed % len(ALPHAS)], weight, bias, (1e-5, 0.1)[seed % 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_cpp_add_layer_norm(dtype, seed):
    x, residual, alpha, weight, bias, eps = norm_case(seed, dtype)
    total, normed, mean, rstd = ops.add_layer_norm(x, residual, alpha, weight, bias, eps)
    expected_sum, expected_out = reference_add_layer_norm(x, residual, alpha, weight, bias, eps)
    assert_close("sum", expected_sum, total, ATOL[dtype])
    assert_close("out", expected_out, normed, ATOL[dtype])
    expected_mean, expected_rstd = reference_stats(expected_sum, eps)
    assert mean.dtype == rstd.dtype == dtype and mean.shape == rstd.shape == (x.shape[0],)
    assert_close("mean", expected_mean, mean, ATOL[dtype])
    assert_close("rstd", expected_rstd, rstd, ATOL[dtype], rtol=ATOL[dtype])

    gen = generator(seed + 1)
    grad_out = randn(gen, *x.shape, dtype=dtype)
    grad_sum = None if seed % 2 else randn(gen, *x.shape, dtype=dtype)
    expected = reference_backward(x, residual, alpha, weight, bias, eps, grad_out, grad_sum)
    actual = ops.add_layer_norm_backward(grad_out, grad_sum, total, mean, rstd, weight, alpha)
    for name, grad in zip(GRAD_NAMES, actual):
        assert_close(name, expected[name], grad, ATOL[dtype], rtol=ATOL[dtype])
    assert actual[2].shape == actual[3].shape == (x.shape[1],)


@pytest.mark.parametrize("seed", SEEDS[::4])
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_cpp_add_layer_norm_reduced(dtype, seed):
    """Half precision in, fp32 statistics: the float64 reference of the same inputs, to the
    rounding of the stored sum and outputs."""
    x, residual, alpha, weight, bias, eps = norm_case(seed, dtype)
    total, normed, mean, rstd = ops.add_layer_norm(x, residual, alpha, weight, bias, eps)
    assert total.dtype == normed.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    expected_sum, expected_out = reference_add_layer_norm(*float64_leaves(x, residual), alpha,
                                                          *float64_leaves(weight, bias), eps)
    assert_close("sum", expected_sum, total.double(), 2e-2, rtol=1e-2)
    assert_close("out", expected_out, normed.double(), 3e-2, rtol=2e-2)
    grad_out = randn(generator(seed + 1), *x.shape, dtype=dtype)
    expected = reference_backward(x, residual, alpha, weight, bias, eps, grad_out, grad_out)
    actual = ops.add_layer_norm_backward(grad_out, grad_out, total, mean, rstd, weight, alpha)
    for name, grad in zip(GRAD_NAMES, actual):
        assert grad.dtype == dtype, name
        assert_close(name, expected[name], grad.double(), 1e-1, rtol=3e-2)


def test_cpp_add_layer_norm_of_constant_rows():
    """A row whose sum is constant normalises to the bias (variance 0, rstd = 1 / sqrt(eps))."""
    x, residual = torch.full((3, 6), 2.0), torch.full((3, 6), -1.0)
    bias = torch.arange(6.0)
    total, normed, mean, rstd = ops.add_layer_norm(x, residual, 0.5, None, bias, 1e-5)
    assert torch.equal(total, torch.full((3, 6), 1.5))
    assert torch.equal(normed, bias.expand(3, 6)) and torch.equal(mean, torch.full((3,), 1.5))
    torch.testing.assert_close(rstd, torch.full((3,), 1e-5 ** -0.5))


LONG_X, LONG_Y, _, _, _ = long_batch()
LONG_R = LONG_X.flip(0)
LONG_W, LONG_B = torch.linspace(0.5, 1.5, 33), torch.linspace(-1, 1, 33)


@pytest.mark.parametrize("output", [0, 1], ids=["sum", "out"])
def test_cpp_every_output_row_written(output):
    assert_every_row_written(
        f"add_layer_norm[{output}]", lambda: ops.add_layer_norm(LONG_X, LONG_R, 0.5, LONG_W, LONG_B, 1e-5)[output],
        lambda: reference_add_layer_norm(LONG_X, LONG_R, 0.5, LONG_W, LONG_B, 1e-5)[output], numel=LONG_X.numel())


@pytest.mark.parametrize("output", [0, 1], ids=["grad_x", "grad_residual"])
def test_cpp_every_backward_row_written(output):
    _, _, mean, rstd = ops.add_layer_norm(LONG_X, LONG_R, 0.5, LONG_W, LONG_B, 1e-5)
    expected = reference_backward(LONG_X, LONG_R, 0.5, LONG_W, LONG_B, 1e-5, LONG_R, LONG_X)
    assert_every_row_written(
        GRAD_NAMES[output], lambda: ops.add_layer_norm_backward(LONG_R, LONG_X, LONG_X + 0.5 * LONG_R, mean, rstd,
                                                                LONG_W, 0.5)[output],
        lambda: expected[GRAD_NAMES[output]].float(), numel=LONG_X.numel())


def test_cpp_non_contiguous_inputs():
    gen = generator(5)
    x, residual = randn(gen, 33, 20)[:, ::2], randn(gen, 20, 33).t()[:, 3:13]
    weight, bias = randn(gen, 20)[::2], randn(gen, 20)[1::2]
    total, normed, mean, rstd = ops.add_layer_norm(x, residual, 0.5, weight, bias, 1e-5)
    expected_sum, expected_out = reference_add_layer_norm(x, residual, 0.5, weight, bias, 1e-5)
    assert_close("sum", expected_sum, total, 1e-5)
    assert_close("out", expected_out, normed, 1e-5)
    grad_out, grad_sum = randn(gen, 30, 33).t()[:, ::3], randn(gen, 33, 10)
    expected = reference_backward(x, residual, 0.5, weight, bias, 1e-5, grad_out, grad_sum)
    actual = ops.add_layer_norm_backward(grad_out, grad_sum, expected_sum, mean, rstd, weight, 0.5)
    for name, grad in zip(GRAD_NAMES, actual):
        assert_close(name, expected[name], grad, 1e-5, rtol=1e-5)


def test_autocast_promotes_to_the_stream_dtype():
    """An fp32 stream plus a bf16 block output is summed and normalised in fp32 (as the add promotes)."""
    x, residual, weight = torch.randn(5, 4), torch.randn(5, 4).bfloat16(), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = ops.add_layer_norm(x, residual, 0.5, weight, None, 1e-5)
        public = dynenc.ops.add_layer_norm(x, residual, 0.5, weight)
    assert [t.dtype for t in direct] == [torch.float32] * 4
    assert [t.dtype for t in public] == [torch.float32] * 2
    expected = reference_add_layer_norm(x, residual.float(), 0.5, weight, None, 1e-5)
    for name, e, a in zip(("sum", "out"), expected, public):
        assert_close(name, e, a, 1e-5)


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_public_function_returns_sum_and_normed(backend_name):
    gen = generator(11)
    x, residual, weight, bias = randn(gen, 7, 16), randn(gen, 7, 16), randn(gen, 16), randn(gen, 16)
    with dynenc.use_backend(backend_name):
        total, normed = dynenc.ops.add_layer_norm(x, residual, 0.5, weight, bias, 1e-5)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    assert_close("sum", x + 0.5 * residual, total, 1e-6)
    assert_close("out", norm(x + 0.5 * residual), normed, 1e-5)


# ----------------------------------------------------------------------------- Triton vs reference
# (N, D): odd D; D = 600 and 3000 (one row per tile, more warps); a long ragged N; N = 0; 1 x 1.
NORM_CASES = [(37, 13), (20, 600), (9, 5), (3, 3000), (300, 33), (0, 7), (1, 1)]
AFFINE = {"weight,bias": (True, True), "weight": (True, False), "none": (False, False)}


def triton_inputs(case, dtype, affine, seed=0):
    num_rows, dim = case
    gen = generator(seed)
    x, residual = (randn(gen, num_rows, dim, dtype=dtype, device=DEVICE) for _ in range(2))
    has_weight, has_bias = AFFINE[affine]
    weight = (1 + 0.3 * randn(gen, dim)).to(dtype).to(DEVICE) if has_weight else None
    bias = (0.3 * randn(gen, dim)).to(dtype).to(DEVICE) if has_bias else None
    return x, residual, weight, bias


# Compiled kernels take float arguments as fp32 (the interpreter keeps them fp64): eps values
# exact in fp32 keep fp64 results comparable to 1e-10 either way.
EPS32 = 2.0 ** -17


def cpu_float64(t):
    return None if t is None else t.detach().cpu().double()


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: "N{}-D{}".format(*c))
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_add_layer_norm(dtype, case, affine):
    x, residual, weight, bias = triton_inputs(case, dtype, affine)
    alpha, eps = (0.5, EPS32) if affine != "weight" else (1.0, 0.125)
    total, normed, mean, rstd = launcher("add_layer_norm")(x, residual, alpha, weight, bias, eps)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == x.dtype
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == stat_dtype and mean.shape == rstd.shape == (x.shape[0],)
    expected_sum, expected_out = reference_add_layer_norm(*map(cpu_float64, (x, residual)), alpha,
                                                          *map(cpu_float64, (weight, bias)), eps)
    tolerance = TRITON_TOLERANCES[dtype]
    assert_close_float64("sum", expected_sum, total, tolerance)
    assert_close_float64("out", expected_out, normed, tolerance)
    # The statistics are those of the rounded sum the op returns.
    expected_mean, expected_rstd = reference_stats(total.cpu(), eps)
    assert_close_float64("mean", expected_mean, mean, TRITON_TOLERANCES[stat_dtype])
    assert_close_float64("rstd", expected_rstd, rstd, TRITON_TOLERANCES[stat_dtype])


@pytest.mark.parametrize("with_grad_sum", [True, False], ids=["grad_sum", "no_grad_sum"])
@pytest.mark.parametrize("affine", ["weight,bias", "none"])
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: "N{}-D{}".format(*c))
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_add_layer_norm_backward(dtype, case, affine, with_grad_sum):
    x, residual, weight, bias = triton_inputs(case, dtype, affine)
    alpha = -2.0 if with_grad_sum else 0.5
    total, _, mean, rstd = launcher("add_layer_norm")(x, residual, alpha, weight, bias, EPS32)
    gen = generator(1)
    grad_out = randn(gen, *x.shape, dtype=dtype, device=DEVICE)
    grad_sum = randn(gen, *x.shape, dtype=dtype, device=DEVICE) if with_grad_sum else None
    actual = launcher("add_layer_norm_backward")(grad_out, grad_sum, total, mean, rstd, weight, alpha)
    # The gradients at the op's own (rounded) sum: LayerNorm's backward reads the sum, not x.
    expected = reference_backward(total, torch.zeros_like(total), alpha, weight, bias, EPS32, grad_out, grad_sum)
    tolerance = TRITON_TOLERANCES[dtype]
    if dtype == torch.float16:  # grad_weight / grad_bias sum over up to 300 rows
        tolerance = dict(atol=5e-2, rtol=1e-2)
    for name, grad in zip(GRAD_NAMES, actual):
        assert grad.dtype == dtype, name
        assert_close_float64(name, expected[name], grad, tolerance)


def test_triton_backward_with_several_tiles_per_program(monkeypatch):
    """Few programs for many row tiles: each program loops over its tiles (the last one past N)
    and its weight / bias partials cover all of them."""
    kernels = pytest.importorskip("dynenc.kernels")
    monkeypatch.setattr(kernels.norm, "TARGET_PROGRAMS", 4)  # 300 rows, 32 per tile: 3 tiles per program
    x, residual, weight, bias = triton_inputs((300, 33), torch.float32, "weight,bias")
    total, _, mean, rstd = launcher("add_layer_norm")(x, residual, 0.5, weight, bias, EPS32)
    grad_out = randn(generator(1), *x.shape, device=DEVICE)
    actual = launcher("add_layer_norm_backward")(grad_out, None, total, mean, rstd, weight, 0.5)
    expected = reference_backward(total, torch.zeros_like(total), 0.5, weight, bias, EPS32, grad_out, None)
    for name, grad in zip(GRAD_NAMES, actual):
        assert_close_float64(name, expected[name], grad, TRITON_TOLERANCES[torch.float32])


def test_triton_cuda_width_limit_is_checked():
    """The CUDA registration rejects rows wider than the Triton kernels serve, naming x / sum."""
    wide = torch.zeros(2, norm_module.MAX_CUDA_FEATURES + 1)
    with pytest.raises(ValueError, match=r"\bx\b.*at most"):
        norm_module._check_add_layer_norm_cuda(wide, wide, 1.0, None, None, 1e-5)
    stats = torch.zeros(2)
    with pytest.raises(ValueError, match=r"\bsum\b.*at most"):
        norm_module._check_add_layer_norm_backward_cuda(wide, None, wide, stats, stats, None, 1.0)
    narrow = torch.zeros(2, norm_module.MAX_CUDA_FEATURES)
    norm_module._check_add_layer_norm_cuda(narrow, narrow, 1.0, None, None, 1e-5)


# ----------------------------------------------------------------------------- registered autograd
def autograd_samples():
    gen = generator(0)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)

    x, residual, weight, bias = leaf(11, 5), leaf(11, 5), leaf(5), leaf(5)
    empty = leaf(0, 5)
    return {"add_layer_norm": [(x, residual, 0.5, weight, bias, 1e-5), (x, residual, 1.0, None, None, 1e-5),
                               (x, residual, -2.0, weight, None, 0.1), (empty, empty, 0.5, weight, bias, 1e-5)]}


class TestAutograd(AutogradChecks):
    samples = autograd_samples()
    outputs = {"add_layer_norm": 2}  # sum, normed (then mean, rstd: statistics for the backward)

    @staticmethod
    def double_backward_refused(name, args):
        return True


def test_opcheck_backward_op():
    gen = generator(3)
    x, residual, weight = (torch.randn(*shape, dtype=torch.float64, generator=gen) for shape in ((9, 6), (9, 6), (6,)))
    total, _, mean, rstd = ops.add_layer_norm(x, residual, 0.5, weight, None, 1e-5)
    for grad_sum, w in ((residual, weight), (None, None)):
        torch.library.opcheck(ops.add_layer_norm_backward.default, (x, grad_sum, total, mean, rstd, w, 0.5))


@pytest.mark.parametrize("used", ["sum", "normed"])
def test_gradient_of_one_output_only(used):
    """An unused output has no gradient (no zero buffer): the sum alone passes its gradient
    to x and alpha * it to residual; the normed output alone is LayerNorm's backward."""
    sample = autograd_samples()["add_layer_norm"][0]
    x, residual, weight, bias = (t.detach().clone().requires_grad_() for t in (*sample[:2], *sample[3:5]))
    grads = {}
    for backend in ("native", "reference"):
        with dynenc.use_backend(backend):
            total, normed = dynenc.ops.add_layer_norm(x, residual, -2.0, weight, bias, 1e-5)
        out = total if used == "sum" else normed
        grads[backend] = torch.autograd.grad((out * torch.arange(5.0, dtype=torch.float64)).sum(),
                                             (x, residual, weight, bias), allow_unused=True, materialize_grads=True)
    for name, native, reference in zip(GRAD_NAMES, grads["native"], grads["reference"]):
        assert_close(name, reference, native, 1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- bad inputs
_X = torch.randn(8, 4)
_W = torch.randn(4)
_STAT = torch.zeros(8)
BAD_CALLS = {
    "x rank": BadCall("add_layer_norm", (torch.randn(8), torch.randn(8), 1.0, None, None, 1e-5), ValueError, "x"),
    "x integer": BadCall("add_layer_norm", (_X.long(), _X.long(), 1.0, None, None, 1e-5), TypeError, "x"),
    "x no features": BadCall("add_layer_norm", (_X[:, :0], _X[:, :0], 1.0, None, None, 1e-5), ValueError, "x"),
    "residual shape": BadCall("add_layer_norm", (_X, _X[:7], 1.0, None, None, 1e-5), ValueError, "residual"),
    "residual dtype": BadCall("add_layer_norm", (_X, _X.double(), 1.0, None, None, 1e-5), TypeError, "residual"),
    "weight shape": BadCall("add_layer_norm", (_X, _X, 1.0, torch.randn(5), None, 1e-5), ValueError, "weight"),
    "weight dtype": BadCall("add_layer_norm", (_X, _X, 1.0, _W.double(), None, 1e-5), TypeError, "weight"),
    "bias shape": BadCall("add_layer_norm", (_X, _X, 1.0, _W, torch.randn(3), 1e-5), ValueError, "bias"),
    "bias rank": BadCall("add_layer_norm", (_X, _X, 1.0, None, torch.randn(1, 4), 1e-5), ValueError, "bias"),
    "eps negative": BadCall("add_layer_norm", (_X, _X, 1.0, None, None, -1e-5), ValueError, "eps"),
    "alpha not finite": BadCall("add_layer_norm", (_X, _X, float("inf"), None, None, 1e-5), ValueError, "alpha"),
    "backward grad_out shape": BadCall("add_layer_norm_backward", (_X[:7], None, _X, _STAT, _STAT, None, 1.0),
                                       ValueError, "grad_out"),
    "backward grad_sum dtype": BadCall("add_layer_norm_backward", (_X, _X.double(), _X, _STAT, _STAT, None, 1.0),
                                       TypeError, "grad_sum"),
    "backward mean dtype": BadCall("add_layer_norm_backward", (_X, None, _X, _STAT.double(), _STAT, None, 1.0),
                                   TypeError, "mean"),
    "backward rstd shape": BadCall("add_layer_norm_backward", (_X, None, _X, _STAT, _STAT[:7], None, 1.0),
                                   ValueError, "rstd"),
    "backward weight shape": BadCall("add_layer_norm_backward", (_X, None, _X, _STAT, _STAT, torch.randn(3), 1.0),
                                     ValueError, "weight"),
}


@pytest.mark.parametrize("bad,entry", bad_call_params(BAD_CALLS))
def test_bad_inputs_raise(bad, entry):
    assert_rejected(bad, entry)
