"""Block-diagonal attention over packed sequences (``dynenc/ops/attention.py``):
varlen_attention (+ backward)."""
import math

import pytest
import torch
from op_testing import (ATOL, DEVICE, EXACT, MANY_LENGTHS, REDUCED, SEEDS, TRITON_DTYPES, AutogradChecks, BadCall,
                        assert_close, assert_close_float64, assert_every_row_written, assert_rejected,
                        bad_call_params, batch_id, cu_seqlens_of, float64_leaves, float64_sample, generator,
                        launcher, long_batch, ragged_cu_seqlens, randint, randn, reference_grads)

from dynenc.ops.attention import reference_varlen_attention

ops = torch.ops.dynenc
GRAD_NAMES = ("grad_q", "grad_k", "grad_v")


def reference_logsumexp(q, k, cu_seqlens, scale):
    """float64 ``[N, H]`` logsumexp of each row's scores over its own sequence."""
    lse = torch.empty(q.shape[:2], dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("thd,shd->hts", q[start:end].double(), k[start:end].double()) * scale
        lse[start:end] = scores.logsumexp(-1).T
    return lse


def attention_grads(q, k, v, cu_seqlens, scale, grad_out):
    return reference_grads(lambda *t: reference_varlen_attention(*t, cu_seqlens, scale), (q, k, v), grad_out)


# ----------------------------------------------------------------------------- C++ vs reference
def attention_case(seed, dtype):
    gen = generator(seed)
    cu = ragged_cu_seqlens(gen, seed)
    h, dh = randint(gen, 1, 3), randint(gen, 1, 9)
    q, k, v = (randn(gen, int(cu[-1]), h, dh, dtype=dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(dh) if seed % 2 else float(torch.rand(1, generator=gen)) * 2
    return q, k, v, cu, scale


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_cpp_varlen_attention(dtype, seed):
    q, k, v, cu, scale = attention_case(seed, dtype)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    out, lse = ops.varlen_attention(q, k, v, cu, max_seqlen, scale)
    assert_close("out", reference_varlen_attention(q, k, v, cu, scale), out, ATOL[dtype])
    assert_close("logsumexp", reference_logsumexp(q, k, cu, scale), lse, 1e-5)
    assert lse.dtype == torch.float32

    grad_out = randn(generator(seed + 1), *q.shape, dtype=dtype)
    actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, max_seqlen, scale)
    for name, e, a in zip(GRAD_NAMES, attention_grads(q, k, v, cu, scale, grad_out), actual):
        assert_close(name, e, a, ATOL[dtype])


def test_cpp_varlen_attention_long_and_short():
    """A sequence long enough to get a parallel kernel call of its own, among short ones that
    are grouped per thread (the seeded cases are all short)."""
    gen = generator(11)
    cu = torch.tensor([0, 3, 303, 303, 310, 311], dtype=torch.int32)
    q, k, v = (randn(gen, 311, 2, 16) for _ in range(3))
    out, lse = ops.varlen_attention(q, k, v, cu, 300, 0.25)
    assert_close("out", reference_varlen_attention(q, k, v, cu, 0.25), out, 1e-5)
    assert_close("logsumexp", reference_logsumexp(q, k, cu, 0.25), lse, 1e-5)
    grad_out = randn(gen, 311, 2, 16)
    actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, 300, 0.25)
    for name, e, a in zip(GRAD_NAMES, attention_grads(q, k, v, cu, 0.25, grad_out), actual):
        assert_close(name, e, a, 1e-5)


@pytest.mark.parametrize("seed", SEEDS[::8])
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_cpp_varlen_attention_reduced(dtype, seed):
    q, k, v, cu, scale = attention_case(seed, dtype)
    out, _ = ops.varlen_attention(q, k, v, cu, 8, scale)
    expected = reference_varlen_attention(q.double(), k.double(), v.double(), cu, scale)
    assert_close("out", expected, out.double(), 3e-2, rtol=1e-2)


def test_cpp_every_output_row_written():
    x, _, _, _, cu = long_batch()
    heads = x.view(300, 3, 11)
    assert_every_row_written("varlen_attention",
                             lambda: ops.varlen_attention(heads, heads, heads, cu, 149, 0.3)[0].view(300, 33),
                             lambda: reference_varlen_attention(heads, heads, heads, cu, 0.3).view(300, 33),
                             numel=x.numel())


def test_cpp_non_contiguous_inputs():
    q = randn(generator(5), 3, 33, 4).transpose(0, 1)
    cu = torch.tensor([0, 5, 5, 33], dtype=torch.int32)
    assert_close("out", reference_varlen_attention(q, q, q, cu, 0.5), ops.varlen_attention(q, q, q, cu, 28, 0.5)[0],
                 1e-5)


def packed_projection(q, k, v):
    """q, k, v as views of one ``[N, 3, H, Dh]`` projection (the layer's layout: rows 3 * H * Dh apart)."""
    return torch.stack((q, k, v), 1).unbind(1)


def test_cpp_reads_packed_projection_views_as_contiguous_inputs():
    q, k, v, cu, scale = attention_case(3, torch.float32)
    views = packed_projection(q, k, v)
    assert not views[0].is_contiguous()
    grad_out = torch.randn_like(q)
    out, lse = ops.varlen_attention(q, k, v, cu, 200, scale)
    packed_out, packed_lse = ops.varlen_attention(*views, cu, 200, scale)
    assert packed_out.is_contiguous()
    assert torch.equal(out, packed_out) and torch.equal(lse, packed_lse)
    grads = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, 200, scale)
    packed_grads = ops.varlen_attention_backward(grad_out, *views, out, lse, cu, 200, scale)
    for name, want, got in zip(GRAD_NAMES, grads, packed_grads):
        assert got.is_contiguous() and torch.equal(want, got), name


# ----------------------------------------------------------------------------- Triton vs reference
# Multi-block sequences (> 64 rows, exact multiples of 64), T = 1, zero lengths, Dh padded to 16 /
# not a power of two, Dh > 64 (32-row blocks, 128-wide head tiles).
ATTENTION_CASES = [((5, 0, 70, 1, 3), 2, 12), ((1,), 1, 16), ((33, 20), 3, 8), ((40, 0), 1, 80),
                   ((3, 64, 129, 0, 128), 1, 16), (MANY_LENGTHS, 2, 4)]
ATTENTION_IDS = [f"{batch_id(c[0])}-H{c[1]}-Dh{c[2]}" for c in ATTENTION_CASES]
# float64 attention: the interface's scale and logsumexp are fp32, so ~1e-7 relative.
TOLERANCES = {
    torch.float64: dict(atol=1e-6, rtol=1e-6),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


def attention_inputs(case, dtype, seed=0):
    lengths, heads, head_dim = case
    gen = generator(seed)
    q, k, v = (randn(gen, sum(lengths), heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(3))
    return q, k, v, cu_seqlens_of(lengths), max(lengths), 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=ATTENTION_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_varlen_attention(dtype, case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, dtype)
    out, lse = launcher("varlen_attention")(q, k, v, cu_seqlens, max_seqlen, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    q64, k64, v64 = float64_leaves(q, k, v)
    cu_cpu = cu_seqlens.cpu()
    assert_close_float64("out", reference_varlen_attention(q64, k64, v64, cu_cpu, scale), out, TOLERANCES[dtype])
    assert_close_float64("logsumexp", reference_logsumexp(q64, k64, cu_cpu, scale), lse, TOLERANCES[torch.float32])


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=ATTENTION_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_varlen_attention_backward(dtype, case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, dtype)
    out, lse = launcher("varlen_attention")(q, k, v, cu_seqlens, max_seqlen, scale)
    grad_out = randn(generator(1), *q.shape, dtype=dtype, device=DEVICE)
    grads = launcher("varlen_attention_backward")(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    expected = attention_grads(*float64_leaves(q, k, v), cu_seqlens.cpu(), scale, grad_out.cpu().double())
    for name, want, got in zip(GRAD_NAMES, expected, grads):
        assert got.dtype == dtype, name
        assert_close_float64(name, want, got, TOLERANCES[dtype])


@pytest.mark.parametrize("case", ATTENTION_CASES[:3], ids=ATTENTION_IDS[:3])
def test_triton_reads_packed_projection_views_as_contiguous_inputs(case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, torch.float32)
    views = packed_projection(q, k, v)
    out, lse = launcher("varlen_attention")(q, k, v, cu_seqlens, max_seqlen, scale)
    packed_out, packed_lse = launcher("varlen_attention")(*views, cu_seqlens, max_seqlen, scale)
    assert packed_out.is_contiguous()
    assert torch.equal(out, packed_out) and torch.equal(lse, packed_lse)
    grad_out = randn(generator(1), *q.shape, device=DEVICE)
    backward = launcher("varlen_attention_backward")
    grads = backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    packed_grads = backward(grad_out, *views, out, lse, cu_seqlens, max_seqlen, scale)
    for name, want, got in zip(GRAD_NAMES, grads, packed_grads):
        assert got.is_contiguous() and torch.equal(want, got), name


# ----------------------------------------------------------------------------- registered autograd
def autograd_samples():
    gen, cu, _, _ = float64_sample(0)
    q, k, v = (torch.randn(11, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    qkv = torch.randn(11, 3, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    return {"varlen_attention": [(q, k, v, cu, 6, 0.5), (*qkv.unbind(1), cu, 6, 0.5)]}


class TestAutograd(AutogradChecks):
    samples = autograd_samples()

    @staticmethod
    def double_backward_refused(name, args):
        return True


# ----------------------------------------------------------------------------- bad inputs
_Q = torch.randn(8, 2, 4)
_CU = torch.tensor([0, 3, 8], dtype=torch.int32)
_NO_HEADS, _NO_HEAD_DIM = _Q[:, :0], _Q[..., :0]
BAD_CALLS = {
    "cu end": BadCall("varlen_attention", (_Q, _Q, _Q, torch.tensor([0, 7], dtype=torch.int32), 7, 1.0),
                      ValueError, "cu_seqlens", value=True),
    "k shape": BadCall("varlen_attention", (_Q, _Q[:7], _Q[:7], _CU, 5, 1.0), ValueError, "k"),
    "max_seqlen too small": BadCall("varlen_attention", (_Q, _Q, _Q, _CU, 4, 1.0), ValueError, "max_seqlen",
                                    value=True),
    "zero heads": BadCall("varlen_attention", (_NO_HEADS, _NO_HEADS, _NO_HEADS, _CU, 5, 1.0), ValueError, "q"),
    "head_dim 0": BadCall("varlen_attention", (_NO_HEAD_DIM, _NO_HEAD_DIM, _NO_HEAD_DIM, _CU, 5, 1.0), ValueError, "q"),
    "backward logsumexp dtype": BadCall("varlen_attention_backward",
                                        (_Q, _Q, _Q, _Q, _Q, torch.zeros(8, 2).double(), _CU, 5, 1.0),
                                        TypeError, "logsumexp"),
    "backward zero heads": BadCall("varlen_attention_backward", (*[_NO_HEADS] * 5, torch.zeros(8, 0), _CU, 5, 1.0),
                                   ValueError, "q"),
    "backward head_dim 0": BadCall("varlen_attention_backward", (*[_NO_HEAD_DIM] * 5, torch.zeros(8, 2), _CU, 5, 1.0),
                                   ValueError, "q"),
}


@pytest.mark.parametrize("bad,entry", bad_call_params(BAD_CALLS))
def test_bad_inputs_raise(bad, entry):
    """Zero heads / head_dim 0 raise ValueError (the C++ kernel divided by them: SIGFPE)."""
    assert_rejected(bad, entry)
