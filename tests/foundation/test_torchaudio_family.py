"""``dynenc.from_torchaudio`` on torchaudio's wav2vec2 / HuBERT / WavLM models: strict state
dicts both ways and, per utterance, the model's own modules run alone (full depth, per-sample
depth, layer masks, gates, extract_features)."""

import copy

import pytest
import torch
import torchaudio
from foundation_models import torchaudio_layers, torchaudio_tiny, waveforms

import dynenc

VARIANTS = {
    "w2v2-postln-group": dict(),
    "w2v2-preln-layer": dict(layer_norm_first=True, mode="layer_norm"),
    "w2v2-postln-layer-aux": dict(mode="layer_norm", aux=7),
    "wavlm-postln-group": dict(wavlm=True),
    "wavlm-preln-layer-aux": dict(wavlm=True, layer_norm_first=True, mode="layer_norm", aux=5),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def pair(request):
    model = torchaudio_tiny(**VARIANTS[request.param])
    return model, dynenc.from_torchaudio(model).eval()


def test_state_dicts_load_strictly_both_ways(pair):
    model, dynamic = pair
    assert list(dynamic.state_dict()) == list(model.state_dict())
    dynamic.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(dynamic.state_dict(), strict=True)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), dynamic.parameters()))


def _final(model, x):
    return model.aux(x) if model.aux is not None else x


@pytest.mark.parametrize(
    "routing",
    ["full", "depth", "layer_mask", "gates"],
)
def test_each_utterance_equals_the_model_run_alone(pair, routing, backend):
    model, dynamic = pair
    wave, lengths = waveforms()
    num_layers = len(model.encoder.transformer.layers)
    kwargs, masks, gates = {}, [None] * 3, [None] * 3
    if routing == "depth":
        depth = torch.tensor([1, 3, 2])
        kwargs["depth"] = depth
        masks = [torch.arange(num_layers) < d for d in depth]
    elif routing == "layer_mask":
        mask = torch.tensor([[False, True, True], [True, False, True], [False, False, False]])
        kwargs["layer_mask"] = mask
        masks = list(mask)
    elif routing == "gates":
        gates_bl = torch.tensor([[0.3, 1.0, 0.5], [1.0, 0.0, 0.7], [0.9, 0.2, 1.0]])
        kwargs["gates"] = gates_bl
        gates = list(gates_bl)
    with torch.no_grad():
        out, out_lengths = dynamic(wave, lengths, **kwargs)
        for b in range(len(lengths)):
            expected = _final(model, torchaudio_layers(model, wave[b, : lengths[b]], masks[b], gates[b]))
            frames = expected.shape[0]
            assert out_lengths[b] == frames
            torch.testing.assert_close(out[b, :frames], expected, rtol=1e-4, atol=2e-5)
            assert torch.count_nonzero(out[b, frames:]) == 0


def test_full_depth_matches_torchaudio_forward_per_utterance(pair):
    model, dynamic = pair
    wave, lengths = waveforms()
    with torch.no_grad():
        out, _ = dynamic(wave, lengths)
        for b in range(len(lengths)):
            expected, _ = model(wave[b : b + 1, : lengths[b]])
            torch.testing.assert_close(out[b, : expected.shape[1]], expected[0], rtol=1e-4, atol=2e-5)


def test_extract_features_matches_torchaudio(pair):
    model, dynamic = pair
    wave, lengths = waveforms()
    with torch.no_grad():
        features, _ = dynamic.extract_features(wave, lengths, num_layers=2)
        assert len(features) == 2
        for b in range(len(lengths)):
            expected, _ = model.extract_features(wave[b : b + 1, : lengths[b]], num_layers=2)
            for got, want in zip(features, expected):
                torch.testing.assert_close(got[b, : want.shape[1]], want[0], rtol=1e-4, atol=2e-5)


def test_without_lengths_returns_none_lengths_like_torchaudio(pair):
    model, dynamic = pair
    wave = waveforms()[0][:, :2000]
    with torch.no_grad():
        out, out_lengths = dynamic(wave)
        expected, expected_lengths = model(wave)
    assert out_lengths is None and expected_lengths is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)


def test_gradients_match_the_model_run_alone(pair, backend):
    # In float64: several gradients are sums that cancel (a key bias's is 0 in exact arithmetic).
    model, dynamic = (copy.deepcopy(m).double() for m in pair)
    wave, lengths = waveforms((2400, 1500))
    wave = wave.double()
    out, _ = dynamic(wave, lengths, depth=torch.tensor([3, 2]))
    (out**2).sum().backward()
    reference = 0
    for b, depth in enumerate((3, 2)):
        mask = torch.arange(3) < depth
        reference = reference + (_final(model, torchaudio_layers(model, wave[b, : lengths[b]], mask)) ** 2).sum()
    reference.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for name, p in dynamic.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_a_conformer_converts_to_a_dynamic_conformer():
    conformer = torchaudio.models.Conformer(16, 2, 32, 2, 3)
    assert isinstance(dynenc.from_torchaudio(conformer), dynenc.DynamicConformer)


def test_a_model_it_cannot_represent_names_the_difference():
    model = torchaudio_tiny()
    model.encoder.transformer.layers[1].adapter = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"layers\[1\].*extra \['adapter'\]"):
        dynenc.from_torchaudio(model)
    with pytest.raises(TypeError, match="torchaudio.models.Conformer or torchaudio.models.Wav2Vec2Model"):
        dynenc.from_torchaudio(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "factory",
    [
        "wav2vec2_base",
        "hubert_base",
        "wavlm_base",
        "wav2vec2_large",
        "wav2vec2_large_lv60k",
        "hubert_large",
        "wavlm_large",
    ],
)
def test_every_torchaudio_factory_converts(factory):
    torch.manual_seed(0)
    model = getattr(torchaudio.models, factory)(aux_num_out=4 if factory.endswith("base") else None).eval()
    dynamic = dynenc.from_torchaudio(model).eval()
    dynamic.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(dynamic.state_dict(), strict=True)
    if factory.endswith("base"):  # one forward per base model (large ones share their code paths)
        wave, lengths = waveforms((3200, 2000))
        with torch.no_grad():
            out, _ = dynamic(wave, lengths)
            expected = _final(model, torchaudio_layers(model, wave[1, :2000]))
        torch.testing.assert_close(out[1, : expected.shape[0]], expected, rtol=1e-4, atol=5e-5)
