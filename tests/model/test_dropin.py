"""torchaudio users' code beyond ``forward``: layer loops and taps, hooks, wrapped or
parametrized attention, and ``skip_mode="final_norm"`` — each checked against torchaudio itself."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import dynenc

from conformer_pairs import CONFIGS, torchaudio_pair

ATOL = 1e-5
LENGTHS = torch.tensor([11, 7, 3])


def _inputs(dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 11, dim, generator=gen), LENGTHS


def _per_utterance(reference, input, lengths):
    """Oracle: each utterance alone through torchaudio's Conformer."""
    return [reference(input[b:b + 1, :n], lengths[b:b + 1])[0][0] for b, n in enumerate(lengths.tolist())]


def _assert_per_utterance(out, expected, lengths):
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :n], expected[b], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_loop_with_intermediate_ctc_taps(name, backend):
    """A loop over conformer_layers calling ``layer(x [T, B, D], key_padding_mask)`` (intermediate
    CTC) gives, per utterance, torchaudio's layer outputs, and the final tap equals the model."""
    reference, model = torchaudio_pair(CONFIGS[name])
    input, lengths = _inputs(CONFIGS[name]["input_dim"])
    padding = torch.arange(input.shape[1])[None, :] >= lengths[:, None]
    ctc = nn.Linear(input.shape[2], 5)
    ours, theirs = input.transpose(0, 1), [input[b, :n].unsqueeze(1) for b, n in enumerate(lengths.tolist())]
    for layer, layer_ta in zip(model.conformer_layers, reference.conformer_layers):
        ours = layer(ours, padding)
        theirs = [layer_ta(h, None) for h in theirs]
        for b, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(ctc(ours[:n, b]), ctc(theirs[b][:, 0]), atol=ATOL, rtol=0)
        assert torch.equal(ours[padding.t()], torch.zeros_like(ours[padding.t()]))
    torch.testing.assert_close(model(input, lengths)[0], ours.transpose(0, 1), atol=ATOL, rtol=0)


def test_layer_rejects_a_mask_that_is_not_end_padding():
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = True
    with pytest.raises(ValueError, match="key_padding_mask must mark padding at the end"):
        model.conformer_layers[0](torch.randn(4, 2, 32), mask)


def test_hooks_on_layers_and_self_attn_fire():
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    input, lengths = _inputs(32)
    expected, _ = model(input, lengths)
    calls = []
    model.conformer_layers[0].register_forward_hook(lambda module, args, out: calls.append(("layer", out.shape)))
    model.conformer_layers[1].self_attn.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(("self_attn", kwargs["query"].shape)), with_kwargs=True)
    out, _ = model(input, lengths)
    num_rows = int(lengths.sum())
    # The layer hook sees packed rows; self_attn is called like torchaudio calls it, padded [T, B, D].
    assert calls == [("layer", (num_rows, 32)), ("self_attn", (11, 3, 32))]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


class LoRAAttention(nn.Module):
    """A LoRA adapter around a MultiheadAttention, called the way torchaudio calls self_attn."""

    def __init__(self, attention: nn.MultiheadAttention, rank: int = 2) -> None:
        super().__init__()
        self.attention = attention
        dim = attention.embed_dim
        self.down = nn.Parameter(torch.randn(dim, rank) * 0.3)
        self.up = nn.Parameter(torch.randn(rank, dim) * 0.3)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False):
        out, weights = self.attention(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights)
        return out + query @ self.down @ self.up, weights


def test_wrapped_attention_is_called_not_bypassed(backend):
    reference, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    for layer, layer_ta in zip(model.conformer_layers, reference.conformer_layers):
        layer.self_attn = layer_ta.self_attn = LoRAAttention(layer_ta.self_attn)
    input, lengths = _inputs(32)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    out, _ = model(input, lengths)
    _assert_per_utterance(out, _per_utterance(reference, input, lengths), lengths)
    model.train()
    loss = model(input, lengths, layer_mask=mask)[0].square().sum()
    loss.backward()
    adapter = model.conformer_layers[0].self_attn
    assert adapter.down.grad is not None and adapter.down.grad.abs().sum() > 0


class Scaled(nn.Module):
    def forward(self, weight):
        return weight * 1.5


def test_parametrized_attention_keeps_the_fast_path_and_its_values(backend):
    reference, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    for module in (reference, model):
        for layer in module.conformer_layers:
            parametrize.register_parametrization(layer.self_attn, "in_proj_weight", Scaled())
    input, lengths = _inputs(32)
    out, _ = model(input, lengths)
    _assert_per_utterance(out, _per_utterance(reference, input, lengths), lengths)
    assert dynenc.layer._attention_is_plain(model.conformer_layers[0].self_attn)


def test_final_norm_skip_equals_a_torchaudio_layer_with_the_block_switched_off(backend):
    """skip_mode="final_norm": a skipped (sample, layer) applies that layer's final LayerNorm,
    as the seed authors' layer-dropping code does."""
    reference, _ = torchaudio_pair(CONFIGS["bn_attn_first"])
    model = dynenc.DynamicConformer(**CONFIGS["bn_attn_first"], skip_mode="final_norm").eval()
    model.load_state_dict(reference.state_dict())
    input, lengths = _inputs(32)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    for routing in (dict(layer_mask=mask), dict(depth=torch.tensor([3, 1, 0]))):
        out, _ = model(input, lengths, **routing)
        runs = mask if "layer_mask" in routing else torch.arange(3)[None, :] < routing["depth"][:, None]
        for b, n in enumerate(lengths.tolist()):
            x = input[b, :n].unsqueeze(1)
            for layer_id, layer in enumerate(reference.conformer_layers):
                x = layer(x, None) if runs[b, layer_id] else layer.final_layer_norm(x)
            torch.testing.assert_close(out[b, :n], x[:, 0], atol=ATOL, rtol=0)


def test_final_norm_with_soft_gates_interpolates_from_the_normed_input():
    reference, _ = torchaudio_pair(CONFIGS["bn_attn_first"])
    model = dynenc.DynamicConformer(**CONFIGS["bn_attn_first"], skip_mode="final_norm").eval()
    model.load_state_dict(reference.state_dict())
    input, lengths = _inputs(32)
    gates = torch.full((3, 3), 0.25)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    out, _ = model(input, lengths, layer_mask=mask, gates=gates)
    rows = input[0, :11]
    batch = dynenc.VarlenBatch(torch.tensor([0, 11], dtype=torch.int32), 11, 11)
    for layer_id, layer in enumerate(model.conformer_layers):
        base = layer.final_layer_norm(rows)
        rows = base + 0.25 * (layer(rows, batch) - base) if mask[0, layer_id] else base
    torch.testing.assert_close(out[0, :11], rows, atol=ATOL, rtol=0)


def test_skip_mode_is_validated():
    with pytest.raises(ValueError, match="skip_mode must be one of"):
        dynenc.DynamicConformer(**CONFIGS["bn_attn_first"], skip_mode="norm")
