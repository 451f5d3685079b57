"""Misuse that once went silent or failed deep inside: contradictory early-exit budgets, a
policy that cannot run as built, meta-device inputs, sizes no machine holds, a too-short
audio file. Each is a clear error naming what is wrong."""
import pytest
import torch

import dynenc
from dynenc import methods, ops
from dynenc.asr import CTCModel, ModelConfig
from dynenc.asr.features import load_split
from dynenc.methods.early_exit import EarlyExitPolicy
from tone_corpus import write_tone_corpus


@pytest.mark.parametrize("fields, message", [
    pytest.param(dict(fixed_exit=2, criterion="entropy"), r"EarlyExitBudget.criterion='entropy' configures threshold "
                 r"exits; with fixed_exit=2", id="criterion"),
    pytest.param(dict(fixed_exit=2, nbest=64), r"EarlyExitBudget.nbest=64 .* with fixed_exit=2", id="nbest"),
])
def test_a_fixed_exit_refuses_the_threshold_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        methods.EarlyExitBudget(**fields)


def test_a_policy_whose_budget_cannot_run_is_refused_where_it_is_made():
    model = CTCModel(ModelConfig(vocab_size=8, dim=16, num_heads=2, ffn_dim=32, num_layers=4, kernel_size=3,
                                 exit_depths=(2,)))
    with pytest.raises(ValueError, match=r"fixed_exit must be one of the model's exit depths \[2, 4\], got 3"):
        EarlyExitPolicy(model, methods.EarlyExitBudget(fixed_exit=3))
    EarlyExitPolicy(model, methods.EarlyExitBudget(fixed_exit=2))  # one it can run


def test_a_meta_device_input_is_a_clear_error():
    encoder = dynenc.DynamicConformer(16, 2, 32, 2, 3).eval()
    x, lengths = torch.randn(2, 5, 16, device="meta"), torch.tensor([5, 3], device="meta")
    with pytest.raises(ValueError, match="input is on the meta device.*PaddedConformer"):
        encoder(x, lengths)


def test_a_size_no_machine_holds_names_the_argument_and_the_bytes():
    with pytest.raises(ValueError, match=r"num_rows=1000000000000000 needs 8,000,000,000,000,000 bytes"):
        ops.scatter_rows(torch.randn(2, 2), torch.tensor([0, 1]), 10**15)


def test_a_too_short_audio_file_is_named(tmp_path):
    root = write_tone_corpus(tmp_path / "corpus", {"train": ["go", "stop"]})
    short = root / "wav" / "train" / "train_00001.wav"
    import soundfile as sf

    sf.write(str(short), torch.zeros(100).numpy(), 16000, subtype="PCM_16")
    with pytest.raises(ValueError, match=rf"utterance 'train_00001' \({short}\): waveform too short"):
        load_split(root, "train")
