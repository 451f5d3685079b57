"""Smoke test of ``dynenc train`` / ``dynenc eval``: a tiny model trained a few steps on a tiny
tone corpus with two methods, decoded, scored; resume is bit-exact."""
import dataclasses
import json

import pytest
import torch

from dynenc import cli
from dynenc.asr import load_checkpoint
from dynenc.asr import ModelConfig
from tone_corpus import write_tone_splits
from dynenc.asr.train import TrainConfig, train

TINY = TrainConfig(epochs=3, max_frames=1500, lr=3e-3, spec_augment=False,
                   model=ModelConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, kernel_size=5, dropout=0.0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    return write_tone_splits(root, num_train=24, num_dev=4, num_test=6)


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in ("static", "early_exit")])
def test_train_decode_wer(corpus, tmp_path, method):
    config = dataclasses.replace(TINY, method=method)
    train(config, corpus, tmp_path / method, progress=False)
    log = [json.loads(line) for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    loss_key = "ctc" if method == "static" else "ctc2"
    assert log[-1][loss_key] < log[0][loss_key], log
    assert all(0 <= record["dev_wer"] for record in log)
    model, payload = load_checkpoint(tmp_path / method / "model.pt")
    assert model.config.num_layers == 2 and "epoch" in payload
    out = tmp_path / "eval"
    assert cli.main(["eval", "--data", str(corpus), "--runs", str(tmp_path), "--methods", method, "--out", str(out),
                     "--beam", "4", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["methods"][method]["rows"]
    assert rows and all(0 <= r["wer"] and 0 < r["executed_fraction"] <= 1 for r in rows)
    assert all(0 <= r["blank_fraction"] <= 1 for r in rows), "the corpus's blank-frame fraction is reported"
    assert all(r["distinct_masks"] is None for r in rows), "neither method chooses layers per utterance"
    assert "| masks (top) |" in (out / "results.md").read_text()
    assert (out / "wer_vs_compute.png").stat().st_size > 1000


def test_resume_is_bit_exact(corpus, tmp_path):
    config = dataclasses.replace(TINY, method="layer_drop", spec_augment=True)
    train(config, corpus, tmp_path / "straight", progress=False)
    train(dataclasses.replace(config, epochs=3), corpus, tmp_path / "resumed", progress=False, stop_after=2)
    train(config, corpus, tmp_path / "resumed", resume=True, progress=False)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
