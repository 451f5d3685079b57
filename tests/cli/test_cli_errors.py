"""User errors on the command line: one line ``dynenc <command>: error: ...``, exit status 2,
and the full traceback only with ``--debug``."""
import json

import pytest
import torch

from dynenc.cli import main


def _config(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return str(path)


CASES = [
    pytest.param(lambda tmp: ["train", "--data", str(tmp), "--config", str(tmp / "missing.json")], "cannot read config file", id="missing_config"),
    pytest.param(lambda tmp: ["train", "--data", str(tmp), "--config", _config(tmp, "{bad")], "cannot read config file", id="invalid_json"),
    pytest.param(lambda tmp: ["train", "--data", str(tmp), "--config", _config(tmp, json.dumps({"nope": 1}))], "unknown keys",
                 id="unknown_key"),
    pytest.param(lambda tmp: ["train", "--data", str(tmp), "--config", _config(tmp, json.dumps({"epochs": "x"}))],
                 "field 'epochs' must be int", id="wrong_type"),
    pytest.param(lambda tmp: ["train", "--data", str(tmp), "--config", _config(tmp, json.dumps({"lr": None}))],
                 "field 'lr' must be", id="null_value"),
    pytest.param(lambda tmp: ["train", "--data", str(tmp), "--config", _config(tmp, json.dumps({"model": {"dim": 30, "num_heads": 4}}))],
                 "must be divisible by num_heads", id="dim_not_divisible"),
    pytest.param(lambda tmp: ["train", "--epochs", "0", "--data", str(tmp)], "TrainConfig.epochs must be >= 1, got 0", id="zero_epochs"),
    pytest.param(lambda tmp: ["train", "--lr", "-1", "--data", str(tmp)], "TrainConfig.lr must be >= 0.0, got -1.0", id="negative_lr"),
    pytest.param(lambda tmp: ["train", "--data", str(tmp / "none")], "no corpus at", id="missing_corpus"),
    pytest.param(lambda tmp: ["eval", "--data", str(tmp / "none"), "--runs", str(tmp)], "nothing to evaluate: no finished run",
                 id="eval_no_runs"),
    pytest.param(lambda tmp: ["prepare", "--data", str(tmp), "--units", "bpe7"], "units must be 'char' or 'bpe<N>'",
                 id="prepare_bad_units"),
    pytest.param(lambda tmp: ["prepare", "--data", str(tmp / "none")], "train.jsonl not found", id="prepare_no_manifest"),
    pytest.param(lambda tmp: ["eval", "--limit", "0", "--data", str(tmp), "--runs", str(tmp)], "--limit must be >= 1",
                 id="eval_limit_zero"),
    pytest.param(lambda tmp: ["eval", "--limit", "-1", "--data", str(tmp), "--runs", str(tmp)], "--limit must be >= 1",
                 id="eval_limit_negative"),
    pytest.param(lambda tmp: ["eval", "--beam", "-2", "--data", str(tmp), "--runs", str(tmp)], "--beam must be >= 0",
                 id="eval_negative_beam"),
]


@pytest.mark.parametrize("argv,match", CASES)
def test_user_error_is_one_line_with_exit_status_2(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv(tmp_path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"dynenc {argv(tmp_path)[0]}: error: ") and match in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="cannot read config file"):
        main(["train", "--debug", "--data", str(tmp_path), "--config", str(tmp_path / "missing.json")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("argv", [["bench", "--device", "cuda", "--quick"], ["profile", "--device", "cuda"]],
                         ids=["bench", "profile"])
def test_cuda_without_a_gpu_is_a_user_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
