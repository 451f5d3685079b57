"""Every dynenc op on CUDA (Triton, or FlashAttention for half-precision attention) against its
plain-PyTorch reference in float64, forward and backward, in fp32 / bf16 / fp16."""
import pytest
import torch

import dynenc
from dynenc.ops import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
LENGTHS = (70, 0, 1, 129, 33)  # multi-block, empty and single-row sequences


def _cu_seqlens():
    return torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)


ROWS, DIM, ACTIVE = sum(LENGTHS), 48, 100
INDEX = torch.randperm(ROWS, generator=torch.Generator().manual_seed(3))[:ACTIVE].sort().values


def _inputs(name, gen):
    """The floating inputs of op ``name`` (CPU, float32)."""
    shapes = {
        "gated_residual_scatter": [(ROWS, DIM), (ACTIVE, DIM), (ACTIVE,)],
        "gather_rows": [(ROWS, DIM)],
        "scatter_rows": [(ACTIVE, DIM)],
        "varlen_dwconv1d": [(ROWS, DIM), (DIM, 31), (DIM,)],
        "varlen_attention": [(ROWS, 3, 36)] * 3,
    }[name]
    return [torch.randn(shape, generator=gen) for shape in shapes]


def _apply(name, floats, device):
    """Op ``name`` on ``floats`` with its integer arguments on ``device``."""
    index, cu_seqlens = INDEX.to(device), _cu_seqlens().to(device)
    return {
        "gated_residual_scatter": lambda x, y, gate: dynenc.ops.gated_residual_scatter(x, y, gate, index),
        "gather_rows": lambda x: dynenc.ops.gather_rows(x, index),
        "scatter_rows": lambda y: dynenc.ops.scatter_rows(y, index, ROWS),
        "varlen_dwconv1d": lambda x, weight, bias: dynenc.ops.varlen_dwconv1d(x, cu_seqlens, weight, bias),
        "varlen_attention": lambda q, k, v: dynenc.ops.varlen_attention(q, k, v, cu_seqlens, max(LENGTHS)),
    }[name](*floats)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["gated_residual_scatter", "gather_rows", "scatter_rows", "varlen_dwconv1d",
                                  "varlen_attention"])
def test_op_forward_and_backward_match_the_reference(name, dtype):
    gen = torch.Generator().manual_seed(0)
    floats = _inputs(name, gen)
    expected_in = [t.double().requires_grad_() for t in floats]
    with dynenc.use_backend("reference"):
        expected = _apply(name, expected_in, "cpu")
    got_in = [t.to("cuda", dtype).requires_grad_() for t in floats]
    got = _apply(name, got_in, "cuda")
    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(grad_out)
    got.backward(grad_out.to("cuda", dtype))
    # The 31-tap conv sums 31 rounded products: half precision needs a wider margin.
    tolerance = TOLERANCE[dtype] * (10 if name == "varlen_dwconv1d" and dtype != torch.float32 else 1)
    torch.testing.assert_close(got.double().cpu(), expected.detach(), atol=tolerance, rtol=tolerance)
    for i, (want, have) in enumerate(zip(expected_in, got_in)):
        torch.testing.assert_close(have.grad.double().cpu(), want.grad, atol=tolerance * 4, rtol=tolerance * 4,
                                   msg=lambda m, i=i: f"grad of input {i}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [36, 64, 128])
def test_attention_on_both_paths(dtype, head_dim):
    """FlashAttention (half precision, head dims it supports) and Triton (the rest) agree with
    the reference, logsumexp included."""
    gen = torch.Generator().manual_seed(1)
    cu = _cu_seqlens()
    q, k, v = (torch.randn(sum(LENGTHS), 2, head_dim, generator=gen) for _ in range(3))
    scale = head_dim ** -0.5
    out, lse = torch.ops.dynenc.varlen_attention(*(t.to("cuda", dtype) for t in (q, k, v)), cu.cuda(),
                                                 max(LENGTHS), scale)
    expected = reference("varlen_attention")(q.double(), k.double(), v.double(), cu, scale)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, atol=tolerance, rtol=tolerance)
    assert lse.shape == (sum(LENGTHS), 2) and lse.dtype == torch.float32


def test_build_plan_matches_the_reference():
    gen = torch.Generator().manual_seed(2)
    row_mask = torch.rand(4, sum(LENGTHS), generator=gen) < 0.5
    with dynenc.use_backend("reference"):
        expected = dynenc.ops.build_plan(row_mask, _cu_seqlens())
    got = dynenc.ops.build_plan(row_mask.cuda(), _cu_seqlens().cuda())
    for want, have in zip(expected, got):
        assert torch.equal(have.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [36, 64])
def test_biased_attention_matches_the_reference(dtype, head_dim):
    """WavLM's relative-position bias (always the Triton HAS_BIAS kernels, also for half precision
    at head dims FlashAttention takes without it), dropped-frame positions, forward and the five
    gradients against the float64 reference."""
    gen = torch.Generator().manual_seed(4)
    cu = _cu_seqlens()
    rows, heads = sum(LENGTHS), 3
    positions = torch.cat([torch.randperm(2 * n + 1, generator=gen)[:n].sort().values for n in LENGTHS])
    num_positions = 2 * max(LENGTHS) + 1
    floats = [torch.randn(rows, heads, head_dim, generator=gen) for _ in range(3)]
    floats += [torch.randn(32, heads, generator=gen), 1 + 2 * torch.rand(rows, heads, generator=gen)]
    buckets = dynenc.ops.relative_position_buckets(num_positions, 32, 64)

    def run(tensors, device):
        q, k, v, table, gate = tensors
        return dynenc.ops.varlen_attention(q, k, v, cu.to(device), max(LENGTHS), bias_table=table,
                                           bias_buckets=buckets.to(device), bias_gate=gate,
                                           positions=positions.to(device))

    expected_in = [t.double().requires_grad_() for t in floats]
    with dynenc.use_backend("reference"):
        expected = run(expected_in, "cpu")
    got_in = [t.to("cuda", dtype).requires_grad_() for t in floats]
    got = run(got_in, "cuda")
    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(grad_out)
    got.backward(grad_out.to("cuda", dtype))
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got.double().cpu(), expected.detach(), atol=tolerance, rtol=tolerance)
    for name, want, have in zip(("q", "k", "v", "bias_table", "bias_gate"), expected_in, got_in):
        scale = max(1.0, float(want.grad.abs().max()))  # the table gradient sums many score gradients
        torch.testing.assert_close(have.grad.double().cpu(), want.grad, atol=tolerance * 4 * scale,
                                   rtol=tolerance * 4, msg=lambda m, name=name: f"grad of {name}: {m}")
