"""C++ CPU kernels (``csrc/``) against the plain-PyTorch oracles of ``dynenc/reference.py``.

Forward ops are compared with the reference functions, backward ops with
``torch.autograd.grad`` through them, over a few hundred seeded ragged cases per op (odd
widths, B = 1, T = 1, zero-length sequences, all / no rows active, random distinct index sets).
The ops are called as ``torch.ops.dynenc.*`` directly, so this file does not depend on
``dynenc/ops.py``.
"""
import glob
import importlib.util
import math
import os

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import dynenc._C  # noqa: F401  (registers the dynenc:: ops)
except Exception:  # the package itself may not import; the library alone is enough
    torch.ops.load_library(glob.glob(os.path.join(_ROOT, "dynenc", "_C*.so"))[0])

# The oracle module by path: it needs only torch, whatever state the rest of the package is in.
_spec = importlib.util.spec_from_file_location("dynenc_reference", os.path.join(_ROOT, "dynenc", "reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

ops = torch.ops.dynenc
CASES = 200
EXACT = [torch.float32, torch.float64]
REDUCED = [torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ----------------------------------------------------------------------------- case generators
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randint(gen, low, high):
    """Uniform int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def _cu_seqlens(gen, case):
    """Ragged int32 cu_seqlens cycling through the edge cases: B = 1, all T = 1, zero-length
    sequences (also leading / trailing), an all-empty batch, and random mixes."""
    kind = case % 5
    batch = 1 if kind == 0 else _randint(gen, 1, 6)
    if kind == 1:
        lengths = torch.ones(batch, dtype=torch.int64)
    elif kind == 2:
        lengths = torch.zeros(batch, dtype=torch.int64)
    else:
        lengths = torch.randint(0, 9, (batch,), generator=gen)
        if kind == 3:
            lengths[torch.rand(batch, generator=gen) < 0.4] = 0
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)


def _active(gen, case, num_rows):
    """(index or None, M): all rows, no rows, a random distinct subset, or a prefix."""
    kind = case % 4
    m = num_rows if kind == 0 else 0 if kind == 1 else _randint(gen, 0, num_rows)
    if kind == 3:
        return None, m
    return torch.randperm(num_rows, generator=gen)[:m], m


def _gate(gen, case, m, dtype):
    kind = (case // 4) % 3
    if kind == 0:
        return None
    gate = torch.rand(m, generator=gen, dtype=torch.float64)
    return (gate.round() if kind == 1 else gate).to(dtype)  # hard 0/1 or soft


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _grads(outputs, inputs, grad_outputs):
    """Autograd gradients of the reference, zeros for inputs it does not use."""
    if not outputs.requires_grad:  # e.g. attention over an all-empty batch builds no graph
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(outputs, inputs, grad_outputs, materialize_grads=True)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _close(actual, expected, atol, what, rtol=0.0):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- gated scatter
def _gated_case(seed, dtype):
    gen = _gen(seed)
    n, d = _randint(gen, 0, 24), _randint(gen, 1, 19)
    index, m = _active(gen, seed, n)
    return _randn(gen, n, d, dtype=dtype), _randn(gen, m, d, dtype=dtype), _gate(gen, seed, m, dtype), index


@pytest.mark.parametrize("dtype", EXACT)
def test_gated_residual_scatter(dtype):
    for seed in range(CASES):
        x, y, gate, index = _gated_case(seed, dtype)
        what = f"seed {seed} gate {gate is not None} index {index is not None}"
        _close(ops.gated_residual_scatter(x, y, gate, index), ref.gated_residual_scatter(x, y, gate, index),
               ATOL[dtype], what)

        leaves = [_leaf(x), _leaf(y), _leaf(gate)]
        out = ref.gated_residual_scatter(*leaves, index)
        grad_out = _randn(_gen(seed + 1), *out.shape, dtype=dtype)
        expected = _grads(out, [t for t in leaves if t is not None], grad_out)
        if gate is None:  # the C++ op always returns grad_gate, zeros without a gate
            expected = (*expected, torch.zeros(y.shape[0], dtype=dtype))
        actual = ops.gated_residual_scatter_backward(grad_out, x, y, gate, index)
        for name, a, e in zip(("grad_x", "grad_y", "grad_gate"), actual, expected):
            _close(a, e, ATOL[dtype], f"{what} {name}")


@pytest.mark.parametrize("dtype", REDUCED)
def test_gated_residual_scatter_reduced(dtype):
    for seed in range(0, CASES, 4):
        x, y, gate, index = _gated_case(seed, dtype)
        up = lambda t: None if t is None else t.double()  # noqa: E731
        expected = ref.gated_residual_scatter(up(x), up(y), up(gate), index)
        _close(ops.gated_residual_scatter(x, y, gate, index).double(), expected, 2e-2, f"seed {seed}", rtol=1e-2)


def test_gated_residual_scatter_gate_dtype():
    """A float32 gate on bfloat16 rows is cast like the reference does; grad_gate keeps float32."""
    gen = _gen(0)
    x, y = _randn(gen, 9, 5, dtype=torch.bfloat16), _randn(gen, 4, 5, dtype=torch.bfloat16)
    gate, index = torch.rand(4, generator=gen), torch.tensor([7, 0, 3, 5])
    _close(ops.gated_residual_scatter(x, y, gate, index), ref.gated_residual_scatter(x, y, gate, index), 1e-2, "out")
    grad_gate = ops.gated_residual_scatter_backward(torch.ones_like(x), x, y, gate, index)[2]
    assert grad_gate.dtype == torch.float32


# ----------------------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("dtype", EXACT + REDUCED)
def test_gather_rows(dtype):
    for seed in range(CASES):
        gen = _gen(seed)
        n, d = _randint(gen, 0, 24), _randint(gen, 1, 19)
        x = _randn(gen, n, d, dtype=dtype)
        m = _randint(gen, 0, 30) if n else 0
        index = torch.randint(0, max(n, 1), (m,), generator=gen)  # duplicates are fine for a gather
        assert torch.equal(ops.gather_rows(x, index), ref.gather_rows(x, index)), f"seed {seed}"


@pytest.mark.parametrize("dtype", EXACT + REDUCED)
def test_scatter_rows(dtype):
    for seed in range(CASES):
        gen = _gen(seed)
        n, d = _randint(gen, 0, 24), _randint(gen, 1, 19)
        index, m = _active(gen, seed, n)
        if index is None:
            index = torch.arange(m)
        y = _randn(gen, m, d, dtype=dtype)
        assert torch.equal(ops.scatter_rows(y, index, n), ref.scatter_rows(y, index, n)), f"seed {seed}"


# ----------------------------------------------------------------------------- depthwise conv
def _conv_case(seed, dtype):
    gen = _gen(seed)
    cu = _cu_seqlens(gen, seed)
    c, k = _randint(gen, 1, 13), 2 * _randint(gen, 0, 4) + 1
    bias = _randn(gen, c, dtype=dtype) if seed % 2 else None
    return _randn(gen, int(cu[-1]), c, dtype=dtype), cu, _randn(gen, c, k, dtype=dtype), bias


@pytest.mark.parametrize("dtype", EXACT)
def test_varlen_dwconv1d(dtype):
    for seed in range(CASES):
        x, cu, weight, bias = _conv_case(seed, dtype)
        what = f"seed {seed} cu {cu.tolist()} K {weight.shape[1]}"
        _close(ops.varlen_dwconv1d(x, cu, weight, bias), ref.varlen_dwconv1d(x, cu, weight, bias), ATOL[dtype], what)

        leaves = [_leaf(x), _leaf(weight), _leaf(bias)]
        out = ref.varlen_dwconv1d(leaves[0], cu, leaves[1], leaves[2])
        grad_out = _randn(_gen(seed + 1), *out.shape, dtype=dtype)
        expected = _grads(out, [t for t in leaves if t is not None], grad_out)
        if bias is None:  # the C++ op always returns grad_bias
            expected = (*expected, grad_out.sum(0))
        actual = ops.varlen_dwconv1d_backward(grad_out, x, cu, weight)
        for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), actual, expected):
            _close(a, e, ATOL[dtype], f"{what} {name}")


@pytest.mark.parametrize("dtype", REDUCED)
def test_varlen_dwconv1d_reduced(dtype):
    for seed in range(0, CASES, 4):
        x, cu, weight, bias = _conv_case(seed, dtype)
        up = lambda t: None if t is None else t.double()  # noqa: E731
        expected = ref.varlen_dwconv1d(up(x), cu, up(weight), up(bias))
        _close(ops.varlen_dwconv1d(x, cu, weight, bias).double(), expected, 5e-2, f"seed {seed}", rtol=1e-2)
        grad_out = _randn(_gen(seed + 1), *x.shape, dtype=dtype)
        grad_x, grad_w, _ = ops.varlen_dwconv1d_backward(grad_out, x, cu, weight)
        leaves = [_leaf(up(x)), _leaf(up(weight))]
        ex, ew = _grads(ref.varlen_dwconv1d(leaves[0], cu, leaves[1], None), leaves, grad_out.double())
        _close(grad_x.double(), ex, 5e-2, f"seed {seed} grad_x", rtol=1e-2)
        _close(grad_w.double(), ew, 1e-1, f"seed {seed} grad_weight", rtol=2e-2)


def test_varlen_dwconv1d_long_rows():
    """Rows spanning several parallel chunks and blocks (the unit cases are all one block)."""
    gen = _gen(7)
    cu = torch.tensor([0, 150, 151, 151, 700, 1000], dtype=torch.int32)
    x, weight, bias = _randn(gen, 1000, 37), _randn(gen, 37, 9), _randn(gen, 37)
    _close(ops.varlen_dwconv1d(x, cu, weight, bias), ref.varlen_dwconv1d(x, cu, weight, bias), 1e-5, "forward")
    leaves = [_leaf(x), _leaf(weight)]
    grad_out = _randn(gen, 1000, 37)
    expected = _grads(ref.varlen_dwconv1d(leaves[0], cu, leaves[1], bias), leaves, grad_out)
    actual = ops.varlen_dwconv1d_backward(grad_out, x, cu, weight)
    _close(actual[0], expected[0], 1e-5, "grad_x")
    _close(actual[1], expected[1], 1e-3, "grad_weight")  # sums of 1000 products
    _close(actual[2], grad_out.sum(0), 1e-3, "grad_bias")


def test_float16_conversions_bit_exact():
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


# ----------------------------------------------------------------------------- attention
def _attention_case(seed, dtype):
    gen = _gen(seed)
    cu = _cu_seqlens(gen, seed)
    h, dh = _randint(gen, 1, 3), _randint(gen, 1, 9)
    q, k, v = (_randn(gen, int(cu[-1]), h, dh, dtype=dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(dh) if seed % 2 else float(torch.rand(1, generator=gen)) * 2
    return q, k, v, cu, scale


def _logsumexp(q, k, cu, scale):
    lse = torch.empty(q.shape[:2], dtype=torch.float64)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores = torch.einsum("thd,shd->hts", q[start:end].double(), k[start:end].double()) * scale
        lse[start:end] = scores.logsumexp(-1).transpose(0, 1)
    return lse


@pytest.mark.parametrize("dtype", EXACT)
def test_varlen_attention(dtype):
    for seed in range(CASES):
        q, k, v, cu, scale = _attention_case(seed, dtype)
        what = f"seed {seed} cu {cu.tolist()} shape {tuple(q.shape)}"
        max_seqlen = int((cu[1:] - cu[:-1]).max())
        out, lse = ops.varlen_attention(q, k, v, cu, max_seqlen, scale)
        _close(out, ref.varlen_attention(q, k, v, cu, scale), ATOL[dtype], what)
        _close(lse, _logsumexp(q, k, cu, scale), 1e-5, f"{what} logsumexp")
        assert lse.dtype == torch.float32

        leaves = [_leaf(t) for t in (q, k, v)]
        grad_out = _randn(_gen(seed + 1), *q.shape, dtype=dtype)
        expected = _grads(ref.varlen_attention(*leaves, cu, scale), leaves, grad_out)
        actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, max_seqlen, scale)
        for name, a, e in zip(("grad_q", "grad_k", "grad_v"), actual, expected):
            _close(a, e, ATOL[dtype], f"{what} {name}")


def test_varlen_attention_long_and_short():
    """A sequence long enough to get a parallel kernel call of its own, among short ones that
    are grouped per thread (the unit cases above are all short)."""
    gen = _gen(11)
    cu = torch.tensor([0, 3, 303, 303, 310, 311], dtype=torch.int32)
    q, k, v = (_randn(gen, 311, 2, 16) for _ in range(3))
    out, lse = ops.varlen_attention(q, k, v, cu, 300, 0.25)
    _close(out, ref.varlen_attention(q, k, v, cu, 0.25), 1e-5, "out")
    _close(lse, _logsumexp(q, k, cu, 0.25), 1e-5, "logsumexp")
    leaves = [_leaf(t) for t in (q, k, v)]
    grad_out = _randn(gen, 311, 2, 16)
    expected = _grads(ref.varlen_attention(*leaves, cu, 0.25), leaves, grad_out)
    actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, 300, 0.25)
    for name, a, e in zip(("grad_q", "grad_k", "grad_v"), actual, expected):
        _close(a, e, 1e-5, name)


@pytest.mark.parametrize("dtype", REDUCED)
def test_varlen_attention_reduced(dtype):
    for seed in range(0, CASES, 8):
        q, k, v, cu, scale = _attention_case(seed, dtype)
        out, _ = ops.varlen_attention(q, k, v, cu, 8, scale)
        expected = ref.varlen_attention(q.double(), k.double(), v.double(), cu, scale)
        _close(out.double(), expected, 3e-2, f"seed {seed}", rtol=1e-2)


# ----------------------------------------------------------------------------- build_plan
def test_build_plan():
    for seed in range(CASES):
        gen = _gen(seed)
        cu = _cu_seqlens(gen, seed)
        num_layers, n = _randint(gen, 1, 5), int(cu[-1])
        density = (0.0, 1.0, 0.5, 0.1)[seed % 4]
        row_mask = torch.rand(num_layers, n, generator=gen) < density
        for name, a, e in zip(("indices", "offsets", "active_cu_seqlens"), ops.build_plan(row_mask, cu),
                              ref.build_plan(row_mask, cu)):
            assert a.dtype == e.dtype and torch.equal(a, e), f"seed {seed} {name}: {a} vs {e}"


# ----------------------------------------------------------------------------- every row written
def _poison(numel, dtype):
    """Leaves freed NaN memory behind, so an output row the kernel forgets to write is NaN.
    Several blocks, so the kernel's small allocations (index masks) cannot use up all of it."""
    junk = [torch.full((numel,), float("nan"), dtype=dtype) for _ in range(8)]
    del junk


def test_every_output_row_written():
    gen = _gen(3)
    x, y = _randn(gen, 300, 33), _randn(gen, 120, 33)
    index = torch.randperm(300, generator=gen)[:120]
    gate = torch.rand(120, generator=gen)
    cu = torch.tensor([0, 0, 100, 101, 250, 250, 300], dtype=torch.int32)
    checks = {
        "gated_residual_scatter": (lambda: ops.gated_residual_scatter(x, y, gate, index),
                                   lambda: ref.gated_residual_scatter(x, y, gate, index)),
        "gated_residual_scatter prefix": (lambda: ops.gated_residual_scatter(x, y, None, None),
                                          lambda: ref.gated_residual_scatter(x, y, None, None)),
        "gated_residual_scatter_backward": (lambda: ops.gated_residual_scatter_backward(x, x, y, gate, index)[0],
                                            lambda: torch.where(torch.isin(torch.arange(300), index)[:, None],
                                                                torch.zeros(()), x).index_copy(
                                                0, index, x[index] * (1 - gate)[:, None])),
        "scatter_rows": (lambda: ops.scatter_rows(y, index, 300), lambda: ref.scatter_rows(y, index, 300)),
        "varlen_dwconv1d": (lambda: ops.varlen_dwconv1d(x, cu, y[:5].T.contiguous(), None),
                            lambda: ref.varlen_dwconv1d(x, cu, y[:5].T.contiguous(), None)),
        "varlen_attention": (lambda: ops.varlen_attention(x.view(300, 3, 11), x.view(300, 3, 11),
                                                          x.view(300, 3, 11), cu, 149, 0.3)[0].view(300, 33),
                             lambda: ref.varlen_attention(x.view(300, 3, 11), x.view(300, 3, 11), x.view(300, 3, 11),
                                                          cu, 0.3).view(300, 33)),
    }
    for name, (op, oracle) in checks.items():
        _poison(300 * 33, torch.float32)
        out = op()
        assert torch.isfinite(out).all(), f"{name}: rows left unwritten"
        _close(out, oracle(), 1e-5, name)


def test_non_contiguous_inputs():
    gen = _gen(5)
    x = _randn(gen, 33, 20)[:, ::2]
    y, index = _randn(gen, 10, 20)[:, 1::2], torch.randperm(33, generator=gen)[:20][::2]
    gate = torch.rand(20, generator=gen)[::2]
    _close(ops.gated_residual_scatter(x, y, gate, index), ref.gated_residual_scatter(x, y, gate, index), 1e-5, "gated")
    assert torch.equal(ops.gather_rows(x, index), ref.gather_rows(x, index))
    cu = torch.tensor([0, 5, 5, 33], dtype=torch.int32)
    weight = _randn(gen, 7, 10).T
    _close(ops.varlen_dwconv1d(x, cu, weight, None), ref.varlen_dwconv1d(x, cu, weight, None), 1e-5, "dwconv")
    q = _randn(gen, 3, 33, 4).transpose(0, 1)
    _close(ops.varlen_attention(q, q, q, cu, 28, 0.5)[0], ref.varlen_attention(q, q, q, cu, 0.5), 1e-5, "attention")


# ----------------------------------------------------------------------------- input validation
_X, _Y = torch.randn(8, 4), torch.randn(3, 4)
_CU = torch.tensor([0, 3, 8], dtype=torch.int32)
_W = torch.randn(4, 3)
_Q = torch.randn(8, 2, 4)
_MASK = torch.ones(2, 8, dtype=torch.bool)

BAD_CALLS = {
    "gated index too large": (lambda: ops.gated_residual_scatter(_X, _Y, None, torch.tensor([0, 8, 1])), "index"),
    "gated index negative": (lambda: ops.gated_residual_scatter(_X, _Y, None, torch.tensor([0, -1, 1])), "index"),
    "gated index duplicate": (lambda: ops.gated_residual_scatter(_X, _Y, None, torch.tensor([2, 5, 2])), "index"),
    "gated index int32": (lambda: ops.gated_residual_scatter(_X, _Y, None, torch.tensor([0, 1, 2], dtype=torch.int32)),
                          "index must be int64"),
    "gated index length": (lambda: ops.gated_residual_scatter(_X, _Y, None, torch.tensor([0, 1])), "index"),
    "gated gate shape": (lambda: ops.gated_residual_scatter(_X, _Y, torch.rand(4), None), "gate"),
    "gated y columns": (lambda: ops.gated_residual_scatter(_X, torch.randn(3, 5), None, None), "y"),
    "gated y dtype": (lambda: ops.gated_residual_scatter(_X, _Y.double(), None, None), "y"),
    "gated prefix too long": (lambda: ops.gated_residual_scatter(_X, torch.randn(9, 4), None, None), "y"),
    "gated backward duplicate": (lambda: ops.gated_residual_scatter_backward(
        _X, _X, _Y, None, torch.tensor([1, 1, 2])), "index"),
    "gated backward grad_out": (lambda: ops.gated_residual_scatter_backward(_Y, _X, _Y, None, None), "grad_out"),
    "gather index too large": (lambda: ops.gather_rows(_X, torch.tensor([3, 8])), "index"),
    "gather index negative": (lambda: ops.gather_rows(_X, torch.tensor([-1])), "index"),
    "gather x rank": (lambda: ops.gather_rows(torch.randn(8), torch.tensor([1])), "x"),
    "scatter index too large": (lambda: ops.scatter_rows(_Y, torch.tensor([0, 1, 8]), 8), "index"),
    "scatter index negative": (lambda: ops.scatter_rows(_Y, torch.tensor([0, -8, 1]), 8), "index"),
    "scatter index duplicate": (lambda: ops.scatter_rows(_Y, torch.tensor([4, 1, 4]), 8), "index"),
    "scatter num_rows": (lambda: ops.scatter_rows(_Y, torch.tensor([0, 1, 2]), -1), "num_rows"),
    "conv cu start": (lambda: ops.varlen_dwconv1d(_X, torch.tensor([1, 3, 8], dtype=torch.int32), _W, None),
                      "cu_seqlens"),
    "conv cu decreasing": (lambda: ops.varlen_dwconv1d(_X, torch.tensor([0, 5, 3, 8], dtype=torch.int32), _W, None),
                           "cu_seqlens"),
    "conv cu end": (lambda: ops.varlen_dwconv1d(_X, torch.tensor([0, 3, 9], dtype=torch.int32), _W, None),
                    "cu_seqlens"),
    "conv cu int64": (lambda: ops.varlen_dwconv1d(_X, _CU.long(), _W, None), "cu_seqlens"),
    "conv cu 2-D": (lambda: ops.varlen_dwconv1d(_X, _CU[None], _W, None), "cu_seqlens"),
    "conv even K": (lambda: ops.varlen_dwconv1d(_X, _CU, torch.randn(4, 4), None), "weight"),
    "conv weight channels": (lambda: ops.varlen_dwconv1d(_X, _CU, torch.randn(5, 3), None), "weight"),
    "conv bias shape": (lambda: ops.varlen_dwconv1d(_X, _CU, _W, torch.randn(5)), "bias"),
    "conv backward cu": (lambda: ops.varlen_dwconv1d_backward(_X, _X, torch.tensor([0, 9], dtype=torch.int32), _W),
                         "cu_seqlens"),
    "attention cu end": (lambda: ops.varlen_attention(_Q, _Q, _Q, torch.tensor([0, 7], dtype=torch.int32), 7, 1.0),
                         "cu_seqlens"),
    "attention k shape": (lambda: ops.varlen_attention(_Q, _Q[:7], _Q[:7], _CU, 5, 1.0), "k"),
    "attention backward lse": (lambda: ops.varlen_attention_backward(_Q, _Q, _Q, _Q, _Q, torch.zeros(8, 2).double(),
                                                                     _CU, 5, 1.0), "logsumexp"),
    "plan cu end": (lambda: ops.build_plan(_MASK, torch.tensor([0, 3, 7], dtype=torch.int32)), "cu_seqlens"),
    "plan mask dtype": (lambda: ops.build_plan(_MASK.float(), _CU), "row_mask"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_inputs_raise(name):
    call, argument = BAD_CALLS[name]
    with pytest.raises(RuntimeError, match=argument):
        call()
