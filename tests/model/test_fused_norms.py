"""The residual adds of a layer fused with the LayerNorms after them (``ops.add_layer_norm``):
used for plain ``nn.LayerNorm``s only; a hooked, replaced or subclassed norm (or a hooked
feed-forward / convolution module) is called as a module, so users' code still sees its calls.
Each case is checked against torchaudio's Conformer with the same change."""
import pytest
import torch
from torch import nn

import dynenc

from conformer_pairs import CONFIGS, torchaudio_pair

ATOL = 1e-5
NORMS = ["ffn1.sequential.0", "self_attn_layer_norm", "conv_module.layer_norm", "ffn2.sequential.0", "final_layer_norm"]


def _batch(dim, seed=0, frames=9):
    """Equal lengths: torchaudio's batched forward is then the per-utterance oracle."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, frames, dim, generator=gen), torch.full((3,), frames)


def _op_counts(model, input, lengths):
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input, lengths)
    counts = {event.key: event.count for event in prof.key_averages()}
    return counts.get("dynenc::add_layer_norm", 0), counts.get("aten::layer_norm", 0)


@pytest.mark.parametrize("name", ["bn_attn_first", "gn_conv_first"])
def test_plain_norms_are_fused_with_every_residual_add(name):
    """Four fused adds per layer; only ffn1's norm (the layer input's, after no add) stays."""
    _, model = torchaudio_pair(CONFIGS[name])
    layers = model.num_layers
    assert _op_counts(model, *_batch(model.input_dim)) == (4 * layers, layers)
    with dynenc.use_backend("reference"):  # the reference backend calls no dynenc:: op
        assert _op_counts(model, *_batch(model.input_dim)) == (0, 5 * layers)


def _scale_output(calls):
    def hook(module, args, out):
        calls.append(type(module).__name__)
        return out * 1.5 + 0.1

    return hook


@pytest.mark.parametrize("path", NORMS + ["ffn2", "conv_module"])
@pytest.mark.parametrize("name", ["bn_attn_first", "gn_conv_first"])
def test_hooked_modules_are_called_and_their_hooks_honoured(name, path, backend):
    """A forward hook that changes the output of a norm (or of the module holding it) in layer
    0 fires once per forward and gives torchaudio's result with the same hook."""
    reference, model = torchaudio_pair(CONFIGS[name])
    input, lengths = _batch(model.input_dim)
    calls = {"torchaudio": [], "dynenc": []}
    reference.conformer_layers[0].get_submodule(path).register_forward_hook(_scale_output(calls["torchaudio"]))
    model.conformer_layers[0].get_submodule(path).register_forward_hook(_scale_output(calls["dynenc"]))
    with torch.no_grad():
        expected, _ = reference(input, lengths)
        got, _ = model(input, lengths)
    assert len(calls["dynenc"]) == len(calls["torchaudio"]) == 1
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if backend == "native" and path != "ffn1.sequential.0":  # the others' norms stay fused
        layers = model.num_layers
        assert _op_counts(model, input, lengths) == (4 * layers - 1, layers + 1)


class ShiftedLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward: must be called, not fused."""

    def forward(self, input):
        return super().forward(input) + 0.25


@pytest.mark.parametrize("replacement", [lambda dim: nn.RMSNorm(dim), lambda dim: ShiftedLayerNorm(dim),
                                         lambda dim: nn.LayerNorm(dim, eps=0.1, bias=False)],
                         ids=["rmsnorm", "layernorm_subclass", "layernorm_eps_no_bias"])
@pytest.mark.parametrize("path", NORMS[1:])
def test_replaced_norms_are_used(path, replacement, backend):
    """A norm swapped for another module (or a plain LayerNorm with other settings, which
    stays fused) computes what torchaudio computes with the same swap."""
    reference, model = torchaudio_pair(CONFIGS["bn_conv_first_odd"])
    input, lengths = _batch(model.input_dim)
    torch.manual_seed(3)
    norm = replacement(model.input_dim)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for m in (reference, model):
        m.conformer_layers[1].set_submodule(path, norm)
    with torch.no_grad():
        expected, _ = reference(input, lengths)
        got, _ = model(input, lengths)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["bn_attn_first", "gn_conv_first"])
def test_training_gradients_equal_torchaudio(name, backend):
    """Train mode (BatchNorm batch statistics: all frames valid), forward and every gradient:
    the fused op's backward against torchaudio's adds and LayerNorms."""
    reference, model = torchaudio_pair(CONFIGS[name], seed=4)
    reference.train()
    model.train()
    input, lengths = _batch(model.input_dim, seed=1, frames=7)
    results = []
    for m in (reference, model):
        x = input.clone().requires_grad_()
        out, _ = m(x, lengths)
        (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}))
    (expected, expected_dx, expected_grads), (got, dx, grads) = results
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(dx, expected_dx, atol=1e-4, rtol=1e-4)
    assert grads.keys() == expected_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], expected_grads[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
