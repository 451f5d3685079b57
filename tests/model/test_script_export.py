"""TorchScript, tracing and torch.export of the encoder, in the spirit of torchaudio's own
Conformer tests: script + save + load == eager, traces that hold for new lengths, and an
exported program with dynamic batch and length dimensions."""
import io
from typing import List, Optional, Tuple

import pytest
import torch
import torchaudio
from torch import nn

import dynenc

from conformer_pairs import CONFIGS, torchaudio_pair

ATOL = 1e-5


def _batch(dim, batch_size, frames, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, frames + 1, (batch_size,), generator=gen)
    lengths[0] = frames
    return torch.randn(batch_size, frames, dim, generator=gen), lengths


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torchscript_consistency(name):
    _, model = torchaudio_pair(CONFIGS[name])
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for seed, (batch_size, frames) in enumerate([(3, 12), (1, 5), (4, 20)]):
        input, lengths = _batch(CONFIGS[name]["input_dim"], batch_size, frames, seed)
        expected, _ = model(input, lengths)
        for module in (scripted, loaded):
            out, out_lengths = module(input, lengths)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
            assert torch.equal(out_lengths, lengths)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trace_holds_for_new_lengths_and_batch_sizes(name):
    _, model = torchaudio_pair(CONFIGS[name])
    traced = torch.jit.trace(model, _batch(CONFIGS[name]["input_dim"], 3, 12, 0))
    for seed, (batch_size, frames) in enumerate([(3, 12), (5, 17), (2, 4)]):
        input, lengths = _batch(CONFIGS[name]["input_dim"], batch_size, frames, seed + 1)
        torch.testing.assert_close(traced(input, lengths)[0], model(input, lengths)[0], atol=ATOL, rtol=0)


def test_trace_with_routing_is_a_clear_error():
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    input, lengths = _batch(32, 2, 6, 0)
    with pytest.raises(ValueError, match="torch.jit.trace supports forward"):
        torch.jit.trace(lambda x, n: model(x, n, depth=torch.tensor([1, 2])), (input, lengths))


@pytest.mark.parametrize("name", ["bn_attn_first", "gn_conv_first"])
def test_export_with_dynamic_batch_and_length(name):
    _, model = torchaudio_pair(CONFIGS[name])
    batch, frames = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("frames", min=2, max=4096)
    program = torch.export.export(model, _batch(CONFIGS[name]["input_dim"], 3, 12, 0),
                                  dynamic_shapes=({0: batch, 1: frames}, {0: batch}))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any(target.startswith("dynenc.") for target in targets), "the custom ops are captured as ops"
    for seed, (batch_size, length) in enumerate([(3, 12), (5, 17), (1, 3)]):
        input, lengths = _batch(CONFIGS[name]["input_dim"], batch_size, length, seed + 1)
        torch.testing.assert_close(program.module()(input, lengths)[0], model(input, lengths)[0], atol=ATOL, rtol=0)


class ConformerTranscriber(nn.Module):
    """The encoder of torchaudio's Conformer RNN-T builder: time reduction, projection,
    Conformer, projection, LayerNorm."""

    def __init__(self, input_dim: int = 20, dim: int = 32, output_dim: int = 24) -> None:
        super().__init__()
        self.time_reduction = torchaudio.models.rnnt._TimeReduction(4)
        self.input_linear = nn.Linear(input_dim * 4, dim)
        self.conformer = torchaudio.models.Conformer(input_dim=dim, num_heads=4, ffn_dim=64, num_layers=2,
                                                     depthwise_conv_kernel_size=7, dropout=0.1)
        self.output_linear = nn.Linear(dim, output_dim)
        self.layer_norm = nn.LayerNorm(output_dim)

    def forward(self, input: torch.Tensor, lengths: torch.Tensor):
        x, lengths = self.time_reduction(input, lengths)
        x, lengths = self.conformer(self.input_linear(x), lengths)
        return self.layer_norm(self.output_linear(x)), lengths

    @torch.jit.export
    def infer(self, input: torch.Tensor, lengths: torch.Tensor, states: Optional[List[List[torch.Tensor]]]
              ) -> Tuple[torch.Tensor, torch.Tensor, List[List[torch.Tensor]]]:
        raise RuntimeError("the Conformer transcriber does not stream")


def test_script_a_conformer_rnnt_with_the_encoder_swapped():
    torch.manual_seed(0)
    predictor = torchaudio.models.rnnt._Predictor(10, 24, symbol_embedding_dim=16, num_lstm_layers=1,
                                                  lstm_hidden_dim=16)
    model = torchaudio.models.RNNT(ConformerTranscriber(), predictor, torchaudio.models.rnnt._Joiner(24, 10)).eval()
    model.transcriber.conformer = dynenc.DynamicConformer.from_torchaudio(model.transcriber.conformer).eval()
    scripted = torch.jit.script(model)
    features, lengths = torch.randn(2, 40, 20), torch.tensor([40, 27])
    targets, target_lengths = torch.randint(1, 10, (2, 5)), torch.tensor([5, 3])
    encoded, encoded_lengths = model.transcribe(features, lengths)
    torch.testing.assert_close(scripted.transcribe(features, lengths)[0], encoded, atol=ATOL, rtol=0)
    predicted, predicted_lengths, _ = model.predict(targets, target_lengths, None)
    torch.testing.assert_close(scripted.predict(targets, target_lengths, None)[0], predicted, atol=ATOL, rtol=0)
    joined = model.join(encoded, encoded_lengths, predicted, predicted_lengths)[0]
    torch.testing.assert_close(scripted.join(encoded, encoded_lengths, predicted, predicted_lengths)[0], joined,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("span, match", [
    pytest.param(dict(start=2, stop=1), "start and stop must satisfy", id="start_after_stop"),
    pytest.param(dict(stop=9), "start and stop must satisfy", id="stop_past_the_end"),
    pytest.param(dict(layers=[5]), "layers must be 0-based layer numbers", id="layer_out_of_range"),
])
def test_padded_twin_refuses_a_bad_span(span, match):
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    with pytest.raises(ValueError, match=match):
        dynenc.padded.PaddedConformer(model, **span)


def test_padded_twin_span_runs_only_its_layers():
    """Layers start..stop-1, identity-skipped ones left out of the module."""
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"])
    twin = dynenc.padded.PaddedConformer(model, layers=[0, 2], start=0, stop=2).eval()
    assert len(twin.conformer_layers) == 1
    input, lengths = _batch(32, 3, 9, 0)
    expected, _ = model(input, lengths, layer_mask=torch.tensor([[True, False, False]] * 3))
    torch.testing.assert_close(twin(input, lengths)[0], expected, atol=ATOL, rtol=0)
