"""DynamicConformer vs torchaudio 2.11's Conformer itself (eval mode, fp32)."""
import pytest
import torch

import torchaudio

import dynenc

from conformer_pairs import CONFIGS, per_sample_loop, torchaudio_pair

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


def _swap_activation(model):
    model.conformer_layers[1].ffn2.sequential[2] = torch.nn.ReLU()


def _convolution_first_in_one_layer(model):
    model.conformer_layers[1].convolution_first = True


def _wider_ffn_in_one_layer(model):
    model.conformer_layers[2].ffn1 = torchaudio.models.conformer._FeedForwardModule(32, 48)


def _other_layer_norm_eps(model):
    model.conformer_layers[0].final_layer_norm.eps = 1e-3


@pytest.mark.parametrize("change,match", [
    pytest.param(_swap_activation, r"conformer_layers\[1\]\.ffn2\.sequential\.2 .*expected SiLU\(\), got ReLU",
                 id="relu_in_one_layer"),
    pytest.param(_convolution_first_in_one_layer, r"conformer_layers\[1\].*convolution_first=True",
                 id="conv_first_in_one_layer"),
    pytest.param(_wider_ffn_in_one_layer, r"conformer_layers\[2\]\.ffn1", id="ffn_dim_in_one_layer"),
    pytest.param(_other_layer_norm_eps, r"conformer_layers\[0\]\.final_layer_norm", id="layer_norm_eps"),
])
def test_from_torchaudio_refuses_a_model_it_cannot_represent(change, match):
    """Conversion compares every layer with layer 0's configuration: no silent conversion."""
    model = torchaudio.models.Conformer(**CONFIGS["bn_attn_first"])
    change(model)
    with pytest.raises(ValueError, match=match):
        dynenc.DynamicConformer.from_torchaudio(model)


def test_from_torchaudio_refuses_a_non_conformer():
    with pytest.raises(TypeError, match="model must be a torchaudio.models.Conformer"):
        dynenc.DynamicConformer.from_torchaudio(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("lengths", [[7, 0, 4], [0, 0, 0]], ids=["one_empty", "all_empty"])
def test_zero_length_utterance_gives_zero_rows_and_leaves_others_untouched(lengths, backend):
    reference, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    input = torch.randn(3, 7, 32)
    lengths = torch.tensor(lengths)
    out, out_lengths = model(input, lengths)
    assert torch.equal(out_lengths, lengths)
    assert torch.equal(out[lengths == 0], torch.zeros_like(out[lengths == 0]))
    for b in (lengths > 0).nonzero().flatten().tolist():
        alone = reference(input[b:b + 1, : lengths[b]], lengths[b:b + 1])[0]
        torch.testing.assert_close(out[b, : lengths[b]], alone[0], atol=ATOL, rtol=0)


def test_floating_lengths_count_frames_like_torchaudio():
    """torchaudio marks frame t valid iff t < length: a floating length counts ceil(length) frames."""
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    input = torch.randn(3, 7, 32)
    out, out_lengths = model(input, torch.tensor([7.0, 2.5, 4.0]))
    expected, _ = model(input, torch.tensor([7, 3, 4]))
    assert torch.equal(out, expected) and out_lengths.dtype == torch.float32
