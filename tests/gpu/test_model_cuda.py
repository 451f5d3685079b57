"""The whole model on CUDA: parity with torchaudio, a training step, torch.compile, autocast."""
import pytest
import torch

import dynenc

from conformer_pairs import CONFIGS, per_sample_loop, torchaudio_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LENGTHS = torch.tensor([13, 1, 20, 7])


def _batch(model):
    return torch.randn(len(LENGTHS), int(LENGTHS.max()), model.input_dim), LENGTHS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_model_equals_each_utterance_alone_in_torchaudio(name):
    reference, model = torchaudio_pair(CONFIGS[name], seed=1)
    x, lengths = _batch(model)
    with torch.no_grad():
        expected = per_sample_loop(reference, x, lengths, torch.ones(len(lengths), model.num_layers, dtype=torch.bool))
        got, _ = model.cuda()(x.cuda(), lengths.cuda())
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_cuda_training_step_matches_the_reference_backend():
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"], seed=5)
    model = model.cuda().train()
    x, lengths = (t.cuda() for t in _batch(model))
    mask = torch.rand(len(lengths), model.num_layers, generator=torch.Generator().manual_seed(0)).cuda() < 0.7
    grads = {}
    for backend in ("native", "reference"):
        model.zero_grad()
        with dynenc.use_backend(backend):
            out, _ = model(x, lengths, layer_mask=mask)
        out.square().sum().backward()
        grads[backend] = [p.grad.clone() for p in model.parameters()]
    for native, reference in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(native, reference, atol=1e-3, rtol=1e-3)


def test_torch_compile_on_cuda_matches_eager():
    _, model = torchaudio_pair(CONFIGS["gn_wide_kernel"], seed=2)
    model = model.cuda()
    x, lengths = (t.cuda() for t in _batch(model))
    with torch.no_grad():
        eager, _ = model(x, lengths)
        compiled, _ = torch.compile(model)(x, lengths)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_training_step_on_cuda(dtype):
    """Half-precision attention runs FlashAttention here; outputs stay near fp32 and grads finite."""
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"], seed=3)
    model = model.cuda().train()
    x, lengths = (t.cuda() for t in _batch(model))
    with torch.no_grad():
        reference, _ = model(x, lengths)
    with torch.autocast("cuda", dtype=dtype):
        out, _ = model(x, lengths)
    out.float().square().mean().backward()
    assert (out.float() - reference).abs().max().item() < 5e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
