"""The recipe on CUDA: `dynenc train --device cuda` trains and its checkpoint evaluates on the CPU."""
import dataclasses
import json

import pytest
import torch

from dynenc.asr import load_checkpoint
from dynenc.asr import ModelConfig
from dynenc.methods import FullBudget
from dynenc.asr.evaluate import decode_split
from dynenc.asr.features import load_split
from tone_corpus import write_tone_splits
from dynenc.asr.tokenizer import CharTokenizer
from dynenc.asr.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = TrainConfig(epochs=2, max_frames=1500, lr=3e-3, spec_augment=False,
                   model=ModelConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, kernel_size=5, dropout=0.0))


@pytest.mark.parametrize("method", ["static", "dld", "blank_skip"])
def test_train_on_cuda_then_decode_on_both(tmp_path, method):
    corpus = tmp_path / "speech"
    write_tone_splits(corpus, num_train=12, num_dev=3, num_test=3)
    teacher = {}
    if method == "dld":  # the teacher is moved beside the student on the GPU
        train(TINY, corpus, tmp_path / "static", progress=False, device="cuda")
        teacher = {"teacher": str(tmp_path / "static" / "model.pt")}
    config = dataclasses.replace(TINY, method=method, **teacher)
    train(config, corpus, tmp_path / method, progress=False, device="cuda")
    log = [json.loads(line) for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    model, _ = load_checkpoint(tmp_path / method / "model.pt")
    test = load_split(corpus, "test")
    on_cpu = decode_split(model, test, CharTokenizer(), FullBudget())
    on_gpu = decode_split(model.cuda(), test, CharTokenizer(), FullBudget())
    assert on_gpu["wer"] == pytest.approx(on_cpu["wer"]) and on_gpu["executed_fraction"] == on_cpu["executed_fraction"]
