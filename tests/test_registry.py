"""The torch.library registry: opcheck, gradcheck through the registered autograd,
no silent fallback, torch.compile and torch.profiler names."""
import pytest
import torch

import dynenc
from dynenc import ops

from conftest import CONFIGS, torchaudio_pair


def _ragged(seed, num_rows=11, dim=5, dtype=torch.float64, lengths=(4, 0, 6, 1)):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    assert cu[-1] == num_rows
    x = torch.randn(num_rows, dim, dtype=dtype, generator=gen)
    index = torch.randperm(num_rows, generator=gen)[:6].sort().values
    return gen, cu, x, index


def _op_samples():
    gen, cu, x, index = _ragged(0)
    y = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    gate = torch.rand(6, dtype=torch.float64, generator=gen, requires_grad=True)
    xg = x.clone().requires_grad_()
    weight = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    q, k, v = (torch.randn(11, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.rand(3, 11, generator=gen) < 0.5
    return {
        "gated_residual_scatter": [(xg, y, gate, index), (xg, y, None, None), (xg, y, gate, None)],
        "gather_rows": [(xg, index)],
        "scatter_rows": [(y, index, 11)],
        "varlen_dwconv1d": [(xg, cu, weight, bias), (xg, cu, weight, None)],
        "varlen_attention": [(q, k, v, cu, 6, 0.5)],
        "build_plan": [(mask, cu)],
    }


SAMPLES = _op_samples()
CASES = [(name, i) for name, samples in SAMPLES.items() for i in range(len(samples))]


@pytest.mark.parametrize("name,i", CASES)
def test_opcheck(name, i):
    op = getattr(torch.ops.dynenc, name).default
    torch.library.opcheck(op, SAMPLES[name][i])


@pytest.mark.parametrize("name,i", [c for c in CASES if c[0] != "build_plan"])
def test_gradcheck_through_registered_autograd(name, i):
    op = getattr(torch.ops.dynenc, name)
    args = SAMPLES[name][i]

    def first_output(*a):
        out = op(*a)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(first_output, args, atol=1e-6)


@pytest.mark.parametrize("name,i", [c for c in CASES if c[0] != "build_plan"])
def test_native_backward_matches_reference_autograd(name, i):
    args = SAMPLES[name][i]
    public = {"varlen_attention": lambda q, k, v, cu, m, s: ops.varlen_attention(q, k, v, cu, m, s)}.get(
        name, getattr(ops, name))
    grads = []
    for backend in ("native", "reference"):
        with dynenc.use_backend(backend):
            out = public(*args)
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads.append(torch.autograd.grad(out, inputs, torch.ones_like(out)))
    for native, reference in zip(*grads):
        torch.testing.assert_close(native, reference, atol=1e-10, rtol=1e-10)


def test_no_silent_fallback_on_a_device_without_kernels():
    x = torch.randn(4, 3, device="meta")
    with pytest.raises(NotImplementedError):
        torch.ops.dynenc.gather_rows(x, torch.tensor([0], device="meta")).cpu()


def test_backends_are_explicit():
    assert dynenc.current_backend() == "native"
    with dynenc.use_backend("reference"):
        assert dynenc.current_backend() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        with dynenc.use_backend("cuda"):
            pass


def test_native_forward_calls_the_cpp_ops():
    """Every op of the native forward appears by name in torch.profiler, plus the ranges."""
    _, model = torchaudio_pair(CONFIGS["gn_conv_first"])
    x = torch.randn(3, 9, model.input_dim)
    lengths = torch.tensor([9, 4, 6])
    mask = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, lengths, layer_mask=mask)
    names = {event.key for event in prof.key_averages()}
    for expected in ("dynenc::gather_rows", "dynenc::scatter_rows", "dynenc::gated_residual_scatter",
                     "dynenc::varlen_dwconv1d", "dynenc::varlen_attention", "dynenc::build_plan",
                     "dynenc.plan", "dynenc.pack", "dynenc.unpack", "dynenc.layer0", "dynenc.layer1"):
        assert expected in names, expected


def test_reference_backend_calls_no_cpp_op():
    _, model = torchaudio_pair(CONFIGS["gn_conv_first"])
    with dynenc.use_backend("reference"), torch.profiler.profile() as prof:
        model(torch.randn(2, 5, model.input_dim), torch.tensor([5, 3]))
    assert not [e.key for e in prof.key_averages() if e.key.startswith("dynenc::")]


def test_torch_compile_fullgraph_matches_eager():
    reference, model = torchaudio_pair(CONFIGS["bn_attn_first"], seed=7)
    x = torch.randn(3, 10, model.input_dim)
    lengths = torch.tensor([10, 6, 3])
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        eager, _ = model(x, lengths, layer_mask=mask)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            compiled = torch.compile(model, fullgraph=True)
            got, _ = compiled(x, lengths, layer_mask=mask)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
