"""``dynenc.from_huggingface`` on HF's Wav2Vec2 / HuBERT / WavLM models and ``*ForCTC``: strict
state dicts both ways, HF's call and outputs, and per utterance HF's own model run alone (full
depth, per-sample depth, layer masks), a saved directory round trip, SpecAugment, settings it
cannot represent."""

import copy

import pytest
import torch
import transformers as hf
from foundation_models import hf_layers, hf_tiny, waveforms

import dynenc

VARIANTS = {
    "wav2vec2-postln-group": (hf.Wav2Vec2Config, hf.Wav2Vec2Model, {}),
    "wav2vec2-preln-layer": (
        hf.Wav2Vec2Config,
        hf.Wav2Vec2Model,
        dict(do_stable_layer_norm=True, feat_extract_norm="layer"),
    ),
    "hubert-postln-group": (hf.HubertConfig, hf.HubertModel, {}),
    "hubert-preln-projnorm": (
        hf.HubertConfig,
        hf.HubertModel,
        dict(do_stable_layer_norm=True, feat_proj_layer_norm=True),
    ),
    "wavlm-postln-group": (hf.WavLMConfig, hf.WavLMModel, {}),
    "wavlm-preln-layer": (hf.WavLMConfig, hf.WavLMModel, dict(do_stable_layer_norm=True, feat_extract_norm="layer")),
}
CTC_VARIANTS = {
    "wav2vec2-ctc": (hf.Wav2Vec2Config, hf.Wav2Vec2ForCTC, {}),
    "hubert-ctc-preln": (hf.HubertConfig, hf.HubertForCTC, dict(do_stable_layer_norm=True, feat_extract_norm="layer")),
    "wavlm-ctc-preln": (hf.WavLMConfig, hf.WavLMForCTC, dict(do_stable_layer_norm=True, feat_extract_norm="layer")),
}


def _pair(config_class, model_class, overrides):
    model = hf_tiny(config_class, model_class, **overrides)
    return model, dynenc.from_huggingface(model).eval()


@pytest.fixture(params=list(VARIANTS), scope="module")
def pair(request):
    return _pair(*VARIANTS[request.param])


@pytest.fixture(params=list(CTC_VARIANTS), scope="module")
def ctc_pair(request):
    return _pair(*CTC_VARIANTS[request.param])


def _attention_mask(lengths):
    return (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()


def test_state_dicts_load_strictly_both_ways(pair):
    model, dynamic = pair
    assert list(dynamic.state_dict()) == list(model.state_dict())
    dynamic.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(dynamic.state_dict(), strict=True)


def test_outputs_and_hidden_states_equal_hf_per_utterance(pair, backend):
    model, dynamic = pair
    wave, lengths = waveforms()
    with torch.no_grad():
        out = dynamic(wave, attention_mask=_attention_mask(lengths), output_hidden_states=True)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        for b in range(len(lengths)):
            ref = model(wave[b : b + 1, : lengths[b]], output_hidden_states=True)
            frames = ref.last_hidden_state.shape[1]
            assert out.lengths[b] == frames
            torch.testing.assert_close(
                out.last_hidden_state[b, :frames], ref.last_hidden_state[0], rtol=1e-4, atol=2e-5
            )
            for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states)):
                torch.testing.assert_close(got[b, :frames], want[0], rtol=1e-4, atol=2e-5, msg=f"hidden_states[{i}]")
                assert torch.count_nonzero(got[b, frames:]) == 0
            assert torch.count_nonzero(out.last_hidden_state[b, frames:]) == 0


@pytest.mark.parametrize("routing", ["depth", "layer_mask"])
def test_per_sample_routing_equals_hf_layers_run_alone(pair, routing, backend):
    model, dynamic = pair
    wave, lengths = waveforms()
    if routing == "depth":
        depth = torch.tensor([2, 0, 1])
        kwargs = {"depth": depth}
        masks = [torch.arange(3) < d for d in depth]
    else:
        mask = torch.tensor([[False, True, True], [True, False, True], [True, True, False]])
        kwargs, masks = {"layer_mask": mask}, list(mask)
    with torch.no_grad():
        out = dynamic(wave, attention_mask=_attention_mask(lengths), **kwargs)
        for b in range(len(lengths)):
            expected = hf_layers(model, wave[b, : lengths[b]], masks[b])
            torch.testing.assert_close(out.last_hidden_state[b, : expected.shape[0]], expected, rtol=1e-4, atol=2e-5)


def test_a_pre_ln_sample_at_depth_d_is_hf_truncated_after_layer_d(pair):
    model, dynamic = pair
    if not model.config.do_stable_layer_norm:
        pytest.skip("post-LN models have no final norm")
    wave, lengths = waveforms((3000,))
    with torch.no_grad():
        ref = model(wave, output_hidden_states=True)
        for depth in (1, 2):
            out = dynamic(wave, depth=torch.tensor([depth]))
            expected = model.encoder.layer_norm(ref.hidden_states[depth])
            torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-4, atol=2e-5)


def test_ctc_logits_and_loss_equal_hf(ctc_pair):
    model, dynamic = ctc_pair
    wave, lengths = waveforms()
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100], [7, -100, -100, -100]])
    mask = _attention_mask(lengths)
    with torch.no_grad():
        out = dynamic(wave, attention_mask=mask, labels=labels)
        for b in range(len(lengths)):
            ref = model(wave[b : b + 1, : lengths[b]]).logits[0]
            torch.testing.assert_close(out.logits[b, : ref.shape[0]], ref, rtol=1e-4, atol=2e-5)
            assert torch.count_nonzero(out.logits[b, ref.shape[0] :]) == 0
        if model.config.feat_extract_norm == "layer":  # HF's batched call equals its per-utterance one
            torch.testing.assert_close(
                out.loss, model(wave, attention_mask=mask, labels=labels).loss, rtol=1e-4, atol=1e-5
            )
    assert isinstance(dynamic(wave, attention_mask=mask, return_dict=False), tuple)


def test_a_saved_directory_round_trips(tmp_path):
    model = hf_tiny(hf.WavLMConfig, hf.WavLMForCTC)
    model.save_pretrained(tmp_path)
    reloaded = hf.WavLMForCTC.from_pretrained(tmp_path).eval()
    dynamic = dynenc.from_huggingface(reloaded).eval()
    wave, lengths = waveforms((2000,))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(wave).logits, model(wave).logits, rtol=1e-4, atol=2e-5)
    dynamic.load_state_dict(model.state_dict(), strict=True)


def test_spec_augment_with_given_mask_time_indices_equals_hf():
    model = hf_tiny(
        hf.Wav2Vec2Config, hf.Wav2Vec2Model, mask_time_prob=0.3, do_stable_layer_norm=True, feat_extract_norm="layer"
    )
    dynamic = dynenc.from_huggingface(model).eval()
    wave, _ = waveforms((3000, 3000))
    frames = dynamic(wave).last_hidden_state.shape[1]
    masked = torch.zeros(2, frames, dtype=torch.bool)
    masked[0, 3:6] = masked[1, 10:12] = True
    with torch.no_grad():
        got = dynamic(wave, mask_time_indices=masked).last_hidden_state
        want = model(wave, mask_time_indices=masked).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_training_with_zero_probabilities_equals_eval_and_layerdrop_is_per_sample():
    model = hf_tiny(hf.WavLMConfig, hf.WavLMModel, layerdrop=0.5)
    dynamic = dynenc.from_huggingface(model)
    wave, lengths = waveforms((2000,) * 8)
    with torch.no_grad():
        dynamic.train()
        torch.manual_seed(0)
        report = dynamic(wave, return_report=True).encoder_output.report
        depth = report.frame_depth[:, 0]
        assert len(set(depth.tolist())) > 1  # samples of one batch took different depths
        assert report.tokens_per_layer[0] == report.total_tokens  # HF's WavLM never drops layer 0
        dynamic.encoder.layer_drop = 0.0
        torch.testing.assert_close(dynamic(wave).last_hidden_state, dynamic.eval()(wave).last_hidden_state)


def test_settings_it_cannot_represent_raise_naming_them():
    model = hf_tiny(hf.HubertConfig, hf.HubertModel, conv_pos_batch_norm=True)
    dynamic = dynenc.from_huggingface(model).eval()
    wave, lengths = waveforms((2000, 1500))
    with torch.no_grad():
        out = dynamic(wave, attention_mask=_attention_mask(lengths)).last_hidden_state
        ref = model(wave[1:, :1500]).last_hidden_state[0]
    torch.testing.assert_close(out[1, : ref.shape[0]], ref, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="conv_pos_batch_norm in training"):
        dynamic.train()(wave)
    with pytest.raises(ValueError, match="add_adapter"):
        dynenc.from_huggingface(hf_tiny(hf.Wav2Vec2Config, hf.Wav2Vec2Model, add_adapter=True))
    with pytest.raises(ValueError, match="adapter_attn_dim"):
        dynenc.from_huggingface(
            hf_tiny(hf.Wav2Vec2Config, hf.Wav2Vec2Model, do_stable_layer_norm=True, adapter_attn_dim=8)
        )
    with pytest.raises(TypeError, match="Wav2Vec2Model"):
        dynenc.from_huggingface(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="right padding"):
        dynenc.from_huggingface(model)(wave, attention_mask=torch.tensor([[0] * 1000 + [1] * 1000] * 2))


def test_gradients_match_hf_per_utterance(backend):
    model = hf_tiny(hf.WavLMConfig, hf.WavLMModel, do_stable_layer_norm=True).double()
    dynamic = dynenc.from_huggingface(copy.deepcopy(model)).double()
    wave, lengths = waveforms((2400, 1500))
    wave = wave.double()
    out = dynamic(wave, attention_mask=_attention_mask(lengths), depth=torch.tensor([3, 2]))
    (out.last_hidden_state**2).sum().backward()
    reference = sum(
        (hf_layers(model, wave[b, : lengths[b]], torch.arange(3) < d) ** 2).sum() for b, d in enumerate((3, 2))
    )
    reference.backward()
    grads = dict(model.named_parameters())
    for name, p in dynamic.named_parameters():
        want = grads[name].grad
        if want is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        else:
            torch.testing.assert_close(p.grad, want, msg=lambda m, name=name: f"gradient of {name}: {m}")


class DropFramesAfterLayer0:
    """A routing policy that removes the frames ``drop`` (bool ``[N]`` over packed rows) after
    layer 0, as CTC-blank skipping does."""

    decision_layers = (0,)

    def __init__(self, drop):
        self.drop = drop

    def decide(self, layer, x, schedule):
        return schedule.replace(row_alive=~self.drop), None


def test_frames_left_after_skipping_keep_their_original_positions_for_the_bias(backend):
    model = hf_tiny(hf.WavLMConfig, hf.WavLMModel, max_bucket_distance=12)
    dynamic = dynenc.from_huggingface(model).eval()
    wave, lengths = waveforms((4000, 3000))
    with torch.no_grad():
        projected, _, frames = dynenc.foundation.features.project_waveforms(
            dynamic.feature_extractor, dynamic.feature_projection, wave, lengths
        )
        x = dynamic.encoder.embed(projected, frames)
        keep = [torch.arange(n) % 3 != 1 for n in frames.tolist()]  # every third frame leaves after layer 0
        drop = ~torch.cat(keep)
        out = dynamic.encoder(x, frames, policy=DropFramesAfterLayer0(drop), return_report=True)
        encoder = model.encoder
        for b, n in enumerate(frames.tolist()):
            h = x[b : b + 1, :n]
            bias = encoder.layers[0].attention.compute_bias(n, n)  # [H, n, n] from the original positions
            h = encoder.layers[0](h, position_bias=bias, index=0)[0]
            kept = keep[b].nonzero().squeeze(1)
            rows = h[:, kept]
            sub_bias = bias[:, kept][:, :, kept]
            for i, layer in enumerate(encoder.layers[1:], start=1):
                rows = layer(rows, position_bias=sub_bias, index=i)[0]
            torch.testing.assert_close(out.output[b, kept], rows[0], rtol=1e-4, atol=2e-5)
            dropped = (~keep[b]).nonzero().squeeze(1)
            torch.testing.assert_close(out.output[b, dropped], h[0, dropped], rtol=1e-4, atol=2e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    model = hf_tiny(hf.WavLMConfig, hf.WavLMModel, do_stable_layer_norm=True)
    wave, lengths = waveforms((2400, 1500))
    grads = []
    for checkpointed in (False, True):
        dynamic = dynenc.from_huggingface(model).train()
        dynamic.encoder.checkpoint_layers = checkpointed
        out = dynamic(
            wave, attention_mask=_attention_mask(lengths), layer_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]).bool()
        )
        (out.last_hidden_state**2).sum().backward()
        grads.append({name: p.grad for name, p in dynamic.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=lambda m, name=name: f"{name}: {m}")


def _attention_inputs(frames=(9, 5, 0, 7), heads=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = sum(frames)
    q, k, v = (torch.randn(rows, heads, head_dim, generator=generator) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(frames).cumsum(0).tolist()], dtype=torch.int32)
    batch = dynenc.VarlenBatch(cu, max(frames), rows)
    table = torch.randn(16, heads, generator=generator)
    bias = dynenc.foundation.RelativePositionBias(table, dynenc.ops.relative_position_buckets(max(frames), 16, 40))
    gate = torch.rand(rows, heads, generator=generator) + 0.5
    return q, k, v, batch, bias, gate


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "wavlm-bias"])
def test_dropout_attention_is_the_fused_op_in_expectation(with_bias):
    """Training with attention dropout runs HF's computation on a padded view: with a dropout
    that never fires it equals the fused op, and its mean over many draws converges to it."""
    from dynenc.foundation.layer import dropout_attention

    q, k, v, batch, bias, gate = _attention_inputs()
    bias, gate = (bias, gate) if with_bias else (None, None)
    kwargs = {}
    if with_bias:
        kwargs = dict(bias_table=bias.table, bias_buckets=bias.buckets, bias_gate=gate, positions=batch.positions)
    fused = dynenc.ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, **kwargs)
    torch.testing.assert_close(dropout_attention(q, k, v, batch, 1e-12, bias, gate), fused, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    draws = torch.stack([dropout_attention(q, k, v, batch, 0.3, bias, gate) for _ in range(600)])
    assert not torch.equal(draws[0], draws[1]), "dropout draws differ"
    torch.testing.assert_close(draws.mean(0), fused, rtol=0.0, atol=0.12)


def test_hf_attention_dropout_applies_in_training_only():
    model = hf_tiny(hf.WavLMConfig, hf.WavLMModel, attention_dropout=0.5)
    dynamic = dynenc.from_huggingface(model)
    wave, lengths = waveforms((2000, 1500))
    mask = _attention_mask(lengths)
    with torch.no_grad():
        dynamic.train()
        first, second = (dynamic(wave, attention_mask=mask).last_hidden_state for _ in range(2))
        assert not torch.allclose(first, second), "attention dropout is drawn in training"
        dynamic.eval()
        torch.testing.assert_close(
            dynamic(wave, attention_mask=mask).last_hidden_state,
            dynenc.from_huggingface(model).eval()(wave, attention_mask=mask).last_hidden_state,
        )
