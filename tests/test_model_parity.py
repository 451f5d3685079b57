"""DynamicConformer vs torchaudio 2.11's Conformer itself (eval mode, fp32)."""
import pytest
import torch

import dynenc

from conftest import CONFIGS, per_sample_loop, torchaudio_pair

ATOL = 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch_size,frames", [(3, 17), (1, 9), (2, 1)])
def test_equal_lengths_equal_torchaudio_batched(name, batch_size, frames, backend):
    reference, model = torchaudio_pair(CONFIGS[name])
    x = torch.randn(batch_size, frames, model.input_dim)
    lengths = torch.full((batch_size,), frames)
    with torch.no_grad():
        expected, _ = reference(x, lengths)
        got, got_lengths = model(x, lengths)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(got_lengths, lengths)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixed_lengths_equal_each_utterance_alone(name, backend):
    reference, model = torchaudio_pair(CONFIGS[name], seed=1)
    lengths = torch.tensor([13, 1, 20, 7])
    x = torch.randn(4, 20, model.input_dim)
    everything = torch.ones(4, model.num_layers, dtype=torch.bool)
    with torch.no_grad():
        expected = per_sample_loop(reference, x, lengths, everything)
        got, _ = model(x, lengths)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    pads = torch.arange(20)[None, :] >= lengths[:, None]
    assert torch.count_nonzero(got[pads]) == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_mask_equals_per_sample_loop(name, backend):
    reference, model = torchaudio_pair(CONFIGS[name], seed=2)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([9, 16, 4, 16, 1])
    x = torch.randn(5, 16, model.input_dim, generator=gen)
    mask = torch.rand(5, model.num_layers, generator=gen) < 0.5
    mask[0] = False  # a sample that skips every layer
    mask[1] = True
    with torch.no_grad():
        expected = per_sample_loop(reference, x, lengths, mask)
        out = model(x, lengths, layer_mask=mask, return_report=True)
    torch.testing.assert_close(out.output, expected, atol=ATOL, rtol=0)
    executed = (mask.long() * lengths[:, None]).sum(0).tolist()
    assert out.report.tokens_per_layer == executed
    assert torch.equal(out.report.sample_depth, mask.sum(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_depth_equals_per_sample_loop(name, backend):
    reference, model = torchaudio_pair(CONFIGS[name], seed=4)
    lengths = torch.tensor([5, 12, 12, 3, 8, 1])
    x = torch.randn(6, 12, model.input_dim)
    depth = torch.tensor([0, model.num_layers, 1, 2, 1, model.num_layers]).clamp_max(model.num_layers)
    mask = torch.arange(model.num_layers)[None, :] < depth[:, None]
    with torch.no_grad():
        expected = per_sample_loop(reference, x, lengths, mask)
        out = model(x, lengths, depth=depth, return_report=True)
    torch.testing.assert_close(out.output, expected, atol=ATOL, rtol=0)
    assert torch.equal(out.report.sample_depth, depth)
    assert out.report.tokens_per_layer == (mask.long() * lengths[:, None]).sum(0).tolist()
    frame_depth = out.report.frame_depth
    assert torch.equal(frame_depth, torch.where(torch.arange(12)[None] < lengths[:, None], depth[:, None], 0))


def test_native_and_reference_backends_agree_in_training_mode():
    """Train-mode forward + backward (BatchNorm statistics over valid frames only)."""
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"], seed=5)
    model.train()
    lengths = torch.tensor([7, 11, 3])
    x = torch.randn(3, 11, model.input_dim)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    results = []
    for name in ("native", "reference"):
        model.zero_grad()
        with dynenc.use_backend(name):
            out, _ = model(x, lengths, layer_mask=mask)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for native_grad, reference_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(native_grad, reference_grad, atol=1e-4, rtol=1e-4)


def test_from_torchaudio_keeps_parameter_names():
    reference, model = torchaudio_pair(CONFIGS["gn_conv_first"])
    assert list(reference.state_dict()) == list(model.state_dict())
    fresh = dynenc.DynamicConformer(**CONFIGS["gn_conv_first"])
    fresh.load_state_dict(reference.state_dict(), strict=True)
