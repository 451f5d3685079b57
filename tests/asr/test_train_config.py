"""``dynenc train`` configuration: one ModelConfig nested in TrainConfig, flags generated
from both, JSON via the one config loader, the method's model fields, --resume checks."""
import argparse
import dataclasses

import pytest
import torch

from dynenc import cli
from dynenc.asr import ModelConfig
from dynenc.config import save_config
from dynenc.asr import train as train_module
from dynenc.asr.train import TrainConfig, train


def parse(*argv):
    parser = argparse.ArgumentParser(prog="dynenc train")
    train_module.add_arguments(parser)
    return train_module.config_from_args(parser.parse_args(["--data", "unused", *argv]))


def test_train_config_holds_no_model_fields_of_its_own():
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not train_fields & {f.name for f in dataclasses.fields(ModelConfig)}
    assert TrainConfig().model == ModelConfig(num_layers=6), "dynenc train's model: ModelConfig's defaults, 6 layers"


def test_flags_reach_the_nested_model_config():
    config = parse("--method", "early_exit", "--num-layers", "4", "--dim", "96", "--exit-depths", "1", "3",
                   "--spec-augment", "false", "--lr", "1e-3")
    assert config.method == "early_exit" and config.lr == 1e-3 and config.spec_augment is False
    assert (config.model.num_layers, config.model.dim, config.model.exit_depths) == (4, 96, (1, 3))
    assert config.model.ffn_dim == TrainConfig().model.ffn_dim


@pytest.mark.parametrize("argv, message", [
    pytest.param(("--num-layers", "0"), r"ModelConfig.num_layers must be >= 1, got 0", id="zero-layers"),
    pytest.param(("--dim", "30", "--num-heads", "4"), r"ModelConfig.dim \(30\) must be divisible by num_heads \(4\)",
                 id="dim-not-divisible"),
])
def test_bad_model_flags_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_bad_bool_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse("--spec-augment", "maybe")
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_json_config_round_trips_and_flags_override_it(tmp_path):
    saved = TrainConfig(method="selector", epochs=3, model=ModelConfig(dim=64, num_layers=4, selector_hidden=8))
    save_config(saved, tmp_path / "train.json")
    assert parse("--config", str(tmp_path / "train.json")) == saved
    overridden = parse("--config", str(tmp_path / "train.json"), "--epochs", "5", "--num-layers", "2")
    assert overridden.epochs == 5 and overridden.model.num_layers == 2 and overridden.model.dim == 64


def test_bad_json_config_names_the_field(tmp_path):
    (tmp_path / "train.json").write_text('{"epochs": 3, "model": {"num_layers": null}}')
    with pytest.raises(TypeError, match=r"'num_layers' must be int, got None"):
        parse("--config", str(tmp_path / "train.json"))


@pytest.mark.parametrize("field, value, error, message", [
    pytest.param("skip_threshold", 1.5, ValueError, r"TrainConfig.skip_threshold must lie in \[0.0, 1.0\], got 1.5",
                 id="skip-threshold-above-one"),
    pytest.param("skip_threshold", float("nan"), ValueError, r"TrainConfig.skip_threshold must be finite",
                 id="skip-threshold-nan"),
    pytest.param("strategy", "zero3", ValueError, r"TrainConfig.strategy must be one of .*got 'zero3'",
                 id="unknown-strategy"),
    pytest.param("inter_ctc_weight", 1.0, ValueError, r"TrainConfig.inter_ctc_weight must be < 1", id="inter-ctc-one"),
    pytest.param("inter_ctc_weight", -0.1, ValueError, r"TrainConfig.inter_ctc_weight must lie in", id="inter-ctc-neg"),
])
def test_bad_training_fields_are_refused(field, value, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**{field: value})


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"method must be one of .*got 'magic'"):
        TrainConfig(method="magic")


@pytest.mark.parametrize("method, fields", [
    pytest.param("static", dict(exit_depths=(), blank_skip_depth=0, factorized_ctc=False, selector_hidden=0),
                 id="static"),
    pytest.param("dld", dict(exit_depths=(), blank_skip_depth=0, selector_hidden=0), id="dld"),
    pytest.param("early_exit", dict(exit_depths=(2, 4, 6)), id="early_exit"),
    pytest.param("blank_skip", dict(blank_skip_depth=3, factorized_ctc=True), id="blank_skip"),
    pytest.param("selector", dict(selector_hidden=64), id="selector"),
])
def test_model_config_takes_the_vocabulary_and_the_methods_fields(method, fields):
    model = TrainConfig(method=method).model_config(vocab_size=29)
    assert model.vocab_size == 29 and model.num_layers == 6
    assert {name: getattr(model, name) for name in fields} == fields


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"cannot resume: no checkpoint .*last\.pt"):
        train(TrainConfig(), tmp_path / "no-corpus", tmp_path / "run", resume=True, progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_resume_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--resume", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("dynenc train: error: cannot resume: no checkpoint")


@pytest.mark.parametrize("device, message", [
    pytest.param("tpu", "must be 'cpu' or 'cuda", id="unknown-device"),
    pytest.param("cuda", "CUDA is not available", id="cuda-without-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_cli_device_is_checked_first(tmp_path, capsys, device, message):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--device", device, "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dynenc train: error: --device") and message in err


def test_rank_batches_cover_each_epoch_evenly():
    from dynenc.asr.batching import SpeechBatches
    from dynenc.asr.train import rank_batches

    generator = torch.Generator().manual_seed(0)
    data = [(torch.zeros(int(n), 80), "a") for n in torch.randint(50, 400, (2001,), generator=generator)]
    batches = SpeechBatches(data, max_frames=2500, shuffle=True, seed=0)
    counts = [len(rank_batches(batches, epoch, 0, 1)) for epoch in range(8)]
    assert len(set(counts)) > 1  # bucketing varies the count: a total of epochs x first count would be wrong
    for world in (2, 3):
        for epoch in range(3):
            per_rank = [rank_batches(batches, epoch, rank, world) for rank in range(world)]
            assert len({len(b) for b in per_rank}) == 1
            used = sorted(i for b in per_rank for batch in b for i in batch)
            assert len(used) == len(set(used)) and len(per_rank[0]) * world >= counts[epoch] - world + 1


@pytest.mark.parametrize("fields, error, message", [
    pytest.param(dict(dim="96"), TypeError, r"ModelConfig.dim must be an int, got '96'", id="str-dim"),
    pytest.param(dict(num_layers=2.0), TypeError, r"ModelConfig.num_layers must be an int", id="float-layers"),
    pytest.param(dict(dropout="0.1"), TypeError, r"ModelConfig.dropout must be a float", id="str-dropout"),
    pytest.param(dict(factorized_ctc=1), TypeError, r"ModelConfig.factorized_ctc must be a bool", id="int-bool"),
    pytest.param(dict(exit_depths=(0,)), ValueError, r"ModelConfig.exit_depths must lie in \[1, 8\], got 0",
                 id="exit-depth-zero"),
    pytest.param(dict(blank_skip_depth=8), ValueError, r"blank_skip_depth must lie in \[0, num_layers - 1=7\]",
                 id="blank-skip-at-the-top"),
])
def test_model_config_refuses_wrong_types_with_type_error_and_bad_values_with_value_error(fields, error, message):
    with pytest.raises(error, match=message):
        ModelConfig(**fields)
