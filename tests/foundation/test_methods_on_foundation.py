"""Every method trains and runs inference on a WavLM-family CTC model fine-tuned from a saved
Hugging Face directory and from a torchaudio checkpoint (the papers' setting), and ``dynenc
train`` / ``dynenc eval`` run end to end on one."""

import dataclasses
import json

import pytest
import torch
import transformers as hf
from foundation_models import TORCHAUDIO_TINY, hf_tiny, torchaudio_tiny
from tone_corpus import write_tone_splits

from dynenc import cli, methods
from dynenc.asr import ModelConfig, load_checkpoint
from dynenc.asr.train import TrainConfig, initial_model, train

VOCAB = 7


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """``{"huggingface": saved HF WavLM directory, "torchaudio": torch.save'd torchaudio WavLM}``."""
    root = tmp_path_factory.mktemp("pretrained")
    hf_tiny(hf.WavLMConfig, hf.WavLMModel, do_stable_layer_norm=True, feat_extract_norm="layer").save_pretrained(
        root / "wavlm-hf"
    )
    torch.save(torchaudio_tiny(wavlm=True).state_dict(), root / "wavlm-torchaudio.pt")
    return {"huggingface": str(root / "wavlm-hf"), "torchaudio": str(root / "wavlm-torchaudio.pt")}


# The tiny torchaudio WavLM's factory and arguments, as a user names them.
TORCHAUDIO_FACTORY = "wavlm_model " + json.dumps(
    dict(
        TORCHAUDIO_TINY,
        extractor_mode="group_norm",
        encoder_layer_norm_first=False,
        aux_num_out=None,
        encoder_num_buckets=16,
        encoder_max_distance=40,
    )
)
FACTORY = {"huggingface": "", "torchaudio": TORCHAUDIO_FACTORY}


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6000, 4800, 3600])
    waves = torch.randn(3, 6000, 1, generator=generator) * 0.1
    targets = torch.randint(1, VOCAB, (9,), generator=generator)
    return waves, lengths, targets, torch.tensor([4, 3, 2])


@pytest.mark.parametrize("source", ["huggingface", "torchaudio"])
@pytest.mark.parametrize("method", methods.method_names())
def test_every_method_trains_and_infers_on_a_pretrained_wavlm(pretrained, source, method, backend):
    config = TrainConfig(
        method=method,
        init_from=pretrained[source],
        init_factory=FACTORY[source],
        model=ModelConfig(encoder="wavlm", dropout=0.0),
    )
    torch.manual_seed(0)
    model = initial_model(config, VOCAB)
    assert model.config.encoder == "wavlm" and model.config.upstream["source"] == source
    assert model.encoder.relative_position is not None, "WavLM's relative position bias is kept"
    model.train()
    objective = methods.get_method(method).objective(config, model)
    loss, logs = objective(model, _batch())
    assert torch.isfinite(loss), logs
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and any(torch.count_nonzero(g) for g in grads), "the encoder is trained"
    model.eval()
    waves, lengths, _, _ = _batch(1)
    for label, budget in methods.get_method(method).budgets(model)[:3]:
        result = methods.infer(model, waves, lengths, budget)
        assert result.log_probs.shape[:2] == (3, result.lengths.max()), label
        assert 0 < result.report.executed_fraction <= 1, label


def test_the_pretrained_weights_are_the_ones_fine_tuned(pretrained, tmp_path):
    model = initial_model(TrainConfig(init_from=pretrained["huggingface"], model=ModelConfig(encoder="wavlm")), VOCAB)
    upstream = hf.WavLMModel.from_pretrained(pretrained["huggingface"])
    assert torch.equal(
        model.encoder.layers[1].attention.q_proj.weight, upstream.encoder.layers[1].attention.q_proj.weight
    )
    assert torch.equal(
        model.frontend.feature_extractor.conv_layers[0].conv.weight,
        upstream.feature_extractor.conv_layers[0].conv.weight,
    )
    with pytest.raises(ValueError, match="holds a wavlm encoder, not --encoder hubert"):
        initial_model(TrainConfig(init_from=pretrained["huggingface"], model=ModelConfig(encoder="hubert")), VOCAB)
    with pytest.raises(FileNotFoundError, match="no such file"):
        initial_model(TrainConfig(init_from="/nonexistent/wavlm"), VOCAB)
    state = pretrained["torchaudio"]
    with pytest.raises(ValueError, match="needs --init-factory naming the torchaudio factory"):
        initial_model(TrainConfig(init_from=state), VOCAB)
    with pytest.raises(ValueError, match="needs --init-factory"):
        initial_model(TrainConfig(init_from=state, init_factory="conformer"), VOCAB)
    with pytest.raises(ValueError, match="cannot build torchaudio.models.wavlm_model"):
        initial_model(TrainConfig(init_from=state, init_factory='wavlm_model {"encoder_num_layers": 2'), VOCAB)
    with pytest.raises(ValueError, match="is not a state dict of torchaudio.models.wavlm_base"):
        initial_model(TrainConfig(init_from=state, init_factory="wavlm_base"), VOCAB)
    with pytest.raises(ValueError, match="a directory must be one Hugging Face's save_pretrained wrote"):
        initial_model(TrainConfig(init_from=str(tmp_path)), VOCAB)


def test_dynenc_train_and_eval_fine_tune_a_saved_hf_wavlm(pretrained, tmp_path):
    corpus = write_tone_splits(tmp_path / "speech", num_train=8, num_dev=2, num_test=3)
    config = TrainConfig(
        epochs=2,
        method="layer_drop",
        init_from=pretrained["huggingface"],
        lr=1e-3,
        max_frames=600,
        model=ModelConfig(encoder="wavlm", dropout=0.0),
    )
    train(config, corpus, tmp_path / "runs" / "layer_drop", progress=False)
    log = [json.loads(line) for line in (tmp_path / "runs" / "layer_drop" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(0 <= r["dev_wer"] for r in log)
    model, _ = load_checkpoint(tmp_path / "runs" / "layer_drop" / "model.pt")
    assert model.config.input_features == "waveform" and model.config.upstream["source"] == "huggingface"
    out = tmp_path / "eval"
    assert (
        cli.main(
            [
                "eval",
                "--data",
                str(corpus),
                "--runs",
                str(tmp_path / "runs"),
                "--methods",
                "layer_drop",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    rows = json.loads((out / "results.json").read_text())["methods"]["layer_drop"]["rows"]
    assert rows and all(0 < r["executed_fraction"] <= 1 for r in rows)
    assert (corpus / "waves_train.pt").is_file(), "the waveform cache is kept beside the fbank one"
    onnx = tmp_path / "half.onnx"
    assert (
        cli.main(["export", str(tmp_path / "runs" / "layer_drop" / "model.pt"), "--n-layers", "2", "--out", str(onnx)])
        == 0
    )
    assert onnx.stat().st_size > 10_000
    assert dataclasses.asdict(model.config)["encoder"] == "wavlm"
