"""A WavLM-family CTC checkpoint at a fixed budget: the padded twin equals the packed encoder,
ONNX Runtime equals eager, ``torch.export`` captures the dynenc ops (the fused bias included)
and ``torch.compile`` with a fixed mask equals eager."""

import pytest
import torch

from dynenc.asr import CTCModel, ModelConfig
from dynenc.export import fixed_budget_graph
from dynenc.export.formats import onnx_session, run_onnx, save

MASK = [True, False, True, True]


def _model(encoder: str, pre_norm: bool) -> CTCModel:
    torch.manual_seed(0)
    config = ModelConfig(encoder=encoder, vocab_size=7, dim=32, num_heads=4, ffn_dim=64, num_layers=4, dropout=0.0)
    model = CTCModel(config).eval()
    model.encoder.pre_norm = pre_norm  # the layout of HF's do_stable_layer_norm, at the same weights
    for layer in model.encoder.layers:
        layer.pre_norm = pre_norm
    return model


def _waves():
    generator = torch.Generator().manual_seed(3)
    return 0.1 * torch.randn(2, 8000, 1, generator=generator), torch.tensor([8000, 5600])


@pytest.mark.parametrize("encoder", ["wav2vec2", "wavlm"])
@pytest.mark.parametrize("pre_norm", [False, True], ids=["postln", "preln"])
def test_the_padded_twin_equals_the_packed_encoder(encoder, pre_norm):
    model = _model(encoder, pre_norm)
    waves, lengths = _waves()
    graph = fixed_budget_graph(model, layers=[i for i, runs in enumerate(MASK) if runs])
    with torch.no_grad():
        got, got_lengths = graph(waves, lengths)
        want, want_lengths, _ = model(waves, lengths, layer_mask=torch.tensor([MASK, MASK]))
    assert torch.equal(got_lengths, want_lengths)
    for b, n in enumerate(want_lengths.tolist()):
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-4, atol=1e-5)


def test_onnx_runtime_equals_eager(tmp_path):
    model = _model("wavlm", pre_norm=True)
    waves, lengths = _waves()
    graph = fixed_budget_graph(model, layers=[0, 2, 3])
    (path,) = save(graph, [tmp_path / "wavlm.onnx"], max_frames=400)
    with torch.no_grad():
        want, want_lengths = graph(waves, lengths)
    log_probs, out_lengths = run_onnx(onnx_session(path), waves, lengths)
    assert out_lengths.tolist() == want_lengths.tolist()
    torch.testing.assert_close(torch.from_numpy(log_probs), want, rtol=1e-4, atol=1e-5)


def test_torch_export_and_compile_of_the_encoder_at_a_fixed_mask():
    model = _model("wavlm", pre_norm=False)
    waves, lengths = _waves()
    mask = torch.tensor([MASK, [True, True, False, True]])

    class Encoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, x, frames, layer_mask):
            return self.encoder(x, frames, layer_mask=layer_mask)[0]

    with torch.no_grad():
        x, frames = model.embed(waves, lengths)
        eager = model.encoder(x, frames, layer_mask=mask)[0]
        program = torch.export.export(Encoder(model.encoder), (x, frames, mask))
        ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert "dynenc.varlen_attention.default" in ops and "dynenc.gated_residual_scatter.default" in ops
        torch.testing.assert_close(program.module()(x, frames, mask), eager)
        compiled = torch.compile(model.encoder, backend="aot_eager", dynamic=False)
        torch.testing.assert_close(compiled(x, frames, layer_mask=mask)[0], eager)
