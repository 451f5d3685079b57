"""Depthwise conv over packed sequences (``dynenc/ops/dwconv.py``): varlen_dwconv1d (+ backward)."""
import pytest
import torch
from op_testing import (ATOL, DEVICE, EXACT, MANY_LENGTHS, REDUCED, SEEDS, TRITON_DTYPES, TRITON_TOLERANCES,
                        AutogradChecks, BadCall, assert_close, assert_close_float64, assert_every_row_written,
                        assert_rejected, bad_call_params, batch_id, cu_seqlens_of, float64_leaves, float64_sample,
                        generator, launcher, long_batch, ragged_cu_seqlens, randint, randn, reference_grads)

from dynenc.ops.dwconv import reference_varlen_dwconv1d

ops = torch.ops.dynenc


# ----------------------------------------------------------------------------- C++ vs reference
def conv_case(seed, dtype):
    gen = generator(seed)
    cu = ragged_cu_seqlens(gen, seed)
    c, k = randint(gen, 1, 13), 2 * randint(gen, 0, 4) + 1
    bias = randn(gen, c, dtype=dtype) if seed % 2 else None
    return randn(gen, int(cu[-1]), c, dtype=dtype), cu, randn(gen, c, k, dtype=dtype), bias


def conv_grads(x, cu, weight, bias, grad_out):
    """Reference (grad_x, grad_weight, grad_bias); without a bias grad_bias is grad_out.sum(0),
    which the C++ op always returns."""
    grad_x, grad_weight, grad_bias = reference_grads(lambda x_, w_, b_: reference_varlen_dwconv1d(x_, cu, w_, b_),
                                                     (x, weight, bias), grad_out)
    return grad_x, grad_weight, grad_out.sum(0) if grad_bias is None else grad_bias


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_cpp_varlen_dwconv1d(dtype, seed):
    x, cu, weight, bias = conv_case(seed, dtype)
    assert_close("out", reference_varlen_dwconv1d(x, cu, weight, bias), ops.varlen_dwconv1d(x, cu, weight, bias),
                 ATOL[dtype])
    grad_out = randn(generator(seed + 1), *x.shape, dtype=dtype)
    actual = ops.varlen_dwconv1d_backward(grad_out, x, cu, weight)
    for name, e, a in zip(("grad_x", "grad_weight", "grad_bias"), conv_grads(x, cu, weight, bias, grad_out), actual):
        assert_close(name, e, a, ATOL[dtype])


@pytest.mark.parametrize("seed", SEEDS[::4])
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_cpp_varlen_dwconv1d_reduced(dtype, seed):
    x, cu, weight, bias = conv_case(seed, dtype)
    x64, weight64 = x.double(), weight.double()
    expected = reference_varlen_dwconv1d(x64, cu, weight64, None if bias is None else bias.double())
    assert_close("out", expected, ops.varlen_dwconv1d(x, cu, weight, bias).double(), 5e-2, rtol=1e-2)
    grad_out = randn(generator(seed + 1), *x.shape, dtype=dtype)
    grad_x, grad_w, _ = ops.varlen_dwconv1d_backward(grad_out, x, cu, weight)
    expected_x, expected_w, _ = conv_grads(x64, cu, weight64, None, grad_out.double())
    assert_close("grad_x", expected_x, grad_x.double(), 5e-2, rtol=1e-2)
    assert_close("grad_weight", expected_w, grad_w.double(), 1e-1, rtol=2e-2)


def test_cpp_varlen_dwconv1d_long_rows():
    """Rows spanning several parallel chunks and blocks (the seeded cases are all one block)."""
    gen = generator(7)
    cu = torch.tensor([0, 150, 151, 151, 700, 1000], dtype=torch.int32)
    x, weight, bias = randn(gen, 1000, 37), randn(gen, 37, 9), randn(gen, 37)
    assert_close("out", reference_varlen_dwconv1d(x, cu, weight, bias), ops.varlen_dwconv1d(x, cu, weight, bias), 1e-5)
    grad_out = randn(gen, 1000, 37)
    expected = conv_grads(x, cu, weight, bias, grad_out)
    actual = ops.varlen_dwconv1d_backward(grad_out, x, cu, weight)
    assert_close("grad_x", expected[0], actual[0], 1e-5)
    assert_close("grad_weight", expected[1], actual[1], 1e-3)  # sums of 1000 products
    assert_close("grad_bias", expected[2], actual[2], 1e-3)


def test_cpp_float16_conversions_bit_exact():
    """The kernels' own float16 <-> float32 conversions (csrc/vectorize.h) match torch's bit for
    bit: every float16 pattern goes through a K = 1 conv, out = 0 + w * x, whose product is
    exact in float32, so only the two conversions (and the rounding back) are tested."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(-1, 8)
    cu = torch.tensor([0, x.shape[0]], dtype=torch.int32)
    weight = torch.tensor([1.0, -1.0, 0.5, 3.0, -1.5, 1e-3, 2.0**-10, 7.3], dtype=torch.float16)[:, None]
    out = ops.varlen_dwconv1d(x, cu, weight, None)
    expected = (0 + x.float() * weight.float().T).half()
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def test_cpp_every_output_row_written():
    x, y, _, _, cu = long_batch()
    weight = y[:5].T.contiguous()
    assert_every_row_written("varlen_dwconv1d", lambda: ops.varlen_dwconv1d(x, cu, weight, None),
                             lambda: reference_varlen_dwconv1d(x, cu, weight, None), numel=x.numel())


def test_cpp_non_contiguous_inputs():
    gen = generator(5)
    x = randn(gen, 33, 20)[:, ::2]
    cu = torch.tensor([0, 5, 5, 33], dtype=torch.int32)
    weight = randn(gen, 7, 10).T
    assert_close("out", reference_varlen_dwconv1d(x, cu, weight, None), ops.varlen_dwconv1d(x, cu, weight, None), 1e-5)


# ----------------------------------------------------------------------------- Triton vs reference
# Zero-length sequences, T = 1, B = 1, a sequence longer than a row tile, odd C > BLOCK_C.
CONV_CASES = [((5, 0, 40, 1, 3), 7, 5), ((1,), 3, 1), ((0, 9, 0), 70, 31), ((70,), 5, 3), (MANY_LENGTHS, 4, 7)]
CONV_IDS = [f"{batch_id(c[0])}-C{c[1]}-K{c[2]}" for c in CONV_CASES]


def conv_inputs(case, dtype, seed=0):
    lengths, channels, kernel_size = case
    gen = generator(seed)
    x, weight, bias = (randn(gen, *shape, dtype=dtype, device=DEVICE)
                       for shape in ((sum(lengths), channels), (channels, kernel_size), (channels,)))
    return x, cu_seqlens_of(lengths), weight, bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_varlen_dwconv1d(dtype, case, with_bias):
    x, cu_seqlens, weight, bias = conv_inputs(case, dtype)
    bias = bias if with_bias else None
    out = launcher("varlen_dwconv1d")(x, cu_seqlens, weight, bias)
    x64, weight64, bias64 = float64_leaves(x, weight, bias)
    assert_close_float64("out", reference_varlen_dwconv1d(x64, cu_seqlens.cpu(), weight64, bias64), out,
                         TRITON_TOLERANCES[dtype])


@pytest.mark.parametrize("programs", [None, 2], ids=["default_grid", "multi_tile_programs"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_varlen_dwconv1d_backward(dtype, case, programs, monkeypatch):
    backward = launcher("varlen_dwconv1d_backward")
    if programs:  # few row groups: each program reduces several row tiles into its partials
        monkeypatch.setattr("dynenc.kernels.dwconv.TARGET_PROGRAMS", programs)
    x, cu_seqlens, weight, bias = conv_inputs(case, dtype)
    grad_out = randn(generator(1), *x.shape, dtype=dtype, device=DEVICE)
    grads = backward(grad_out, x, cu_seqlens, weight)
    cu_cpu = cu_seqlens.cpu()
    expected = reference_grads(lambda x_, w_, b_: reference_varlen_dwconv1d(x_, cu_cpu, w_, b_),
                               float64_leaves(x, weight, bias), grad_out.cpu().double())
    for name, want, got in zip(("grad_x", "grad_weight", "grad_bias"), expected, grads):
        assert_close_float64(name, want, got, TRITON_TOLERANCES[dtype])


# ----------------------------------------------------------------------------- registered autograd
def autograd_samples():
    gen, cu, x, _ = float64_sample(0)
    weight = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    x.requires_grad_()
    return {"varlen_dwconv1d": [(x, cu, weight, bias), (x, cu, weight, None)]}


class TestAutograd(AutogradChecks):
    samples = autograd_samples()

    @staticmethod
    def double_backward_refused(name, args):
        return True


# ----------------------------------------------------------------------------- bad inputs
_X, _W = torch.randn(8, 4), torch.randn(4, 3)
_CU = torch.tensor([0, 3, 8], dtype=torch.int32)
BAD_CALLS = {
    "cu start": BadCall("varlen_dwconv1d", (_X, torch.tensor([1, 3, 8], dtype=torch.int32), _W, None),
                        ValueError, "cu_seqlens", value=True),
    "cu decreasing": BadCall("varlen_dwconv1d", (_X, torch.tensor([0, 5, 3, 8], dtype=torch.int32), _W, None),
                             ValueError, "cu_seqlens", value=True),
    "cu end": BadCall("varlen_dwconv1d", (_X, torch.tensor([0, 3, 9], dtype=torch.int32), _W, None),
                      ValueError, "cu_seqlens", value=True),
    "cu int64": BadCall("varlen_dwconv1d", (_X, _CU.long(), _W, None), TypeError, "cu_seqlens"),
    "cu 2-D": BadCall("varlen_dwconv1d", (_X, _CU[None], _W, None), ValueError, "cu_seqlens"),
    "even K": BadCall("varlen_dwconv1d", (_X, _CU, torch.randn(4, 4), None), ValueError, "weight"),
    "weight channels": BadCall("varlen_dwconv1d", (_X, _CU, torch.randn(5, 3), None), ValueError, "weight"),
    "bias shape": BadCall("varlen_dwconv1d", (_X, _CU, _W, torch.randn(5)), ValueError, "bias"),
    "backward cu end": BadCall("varlen_dwconv1d_backward", (_X, _X, torch.tensor([0, 9], dtype=torch.int32), _W),
                               ValueError, "cu_seqlens", value=True),
}


@pytest.mark.parametrize("bad,entry", bad_call_params(BAD_CALLS))
def test_bad_inputs_raise(bad, entry):
    assert_rejected(bad, entry)
