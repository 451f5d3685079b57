"""Faults a real training run meets: a second job on the same run directory, a killed job's
stale lock, non-finite losses (forced, and from a diverging learning rate), an ``--init``
checkpoint of another model."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from killing import kill_and_resume
from tone_corpus import write_tone_splits

from dynenc import cli
from dynenc.asr import ModelConfig, load_checkpoint
from dynenc.asr import train as train_module
from dynenc.asr.train import TrainConfig, train
from dynenc.errors import NonFiniteTraining, RunDirectoryLocked
from dynenc.runlock import LOCK_FILE, hold_run_directory

TINY = TrainConfig(epochs=2, max_frames=1500, lr=3e-3, spec_augment=False,
                   model=ModelConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, kernel_size=5, dropout=0.0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tone_splits(tmp_path_factory.mktemp("tones"), num_train=16, num_dev=3, num_test=3)


def _strict_json_lines(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _finite_weights(path):
    model, _ = load_checkpoint(path)
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_a_second_job_on_a_run_directory_fails_at_once_and_a_killed_jobs_lock_is_taken_over(corpus, tmp_path):
    out = tmp_path / "run"
    train_cli = [sys.executable, "-m", "dynenc", "train", "--data", str(corpus), "--out", str(out), "--quiet",
                 "--dim", "32", "--num-heads", "2", "--ffn-dim", "64", "--num-layers", "2"]
    first = subprocess.Popen(train_cli + ["--epochs", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOCK_FILE).is_file() and (out / LOCK_FILE).read_text()):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first job never took the lock"
            time.sleep(0.2)
        second = subprocess.run(train_cli + ["--epochs", "1"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith("dynenc train: error: ") and len(second.stderr.strip().splitlines()) == 1
        assert f"run directory {out} is in use by another job" in second.stderr
        assert f"PID {first.pid}" in second.stderr and "started" in second.stderr
        assert not (out / "log.jsonl").exists() or "epoch" in (out / "log.jsonl").read_text()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with pytest.warns(UserWarning, match=rf"taking over the lock of a job that is gone \(.*PID {first.pid}"):
        with hold_run_directory(out):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (out / LOCK_FILE).read_text() == "", "a clean end leaves no holder record"


def test_the_lock_is_refused_to_a_second_holder_in_process_too(tmp_path):
    with hold_run_directory(tmp_path):
        with pytest.raises(RunDirectoryLocked, match=f"PID {os.getpid()}"):
            with hold_run_directory(tmp_path):
                pass
    with hold_run_directory(tmp_path):  # released: free again
        pass


def test_a_forced_nan_step_is_skipped_counted_and_logged_as_strict_json(corpus, tmp_path, monkeypatch):
    forward, calls = train_module.ObjectiveModule.forward, []

    def nan_on_the_second_step(self, batch):
        loss, logs = forward(self, batch)
        calls.append(1)
        if len(calls) == 2:
            return loss * float("nan"), {**logs, "ctc": float("nan")}
        return loss, logs

    monkeypatch.setattr(train_module.ObjectiveModule, "forward", nan_on_the_second_step)
    train(TINY, corpus, tmp_path, progress=False)
    log = _strict_json_lines(tmp_path / "log.jsonl")
    assert [record["skipped_steps"] for record in log] == [1, 0]
    assert all(0 < record["ctc"] < float("inf") for record in log), "the skipped step's loss is not averaged in"
    assert _finite_weights(tmp_path / "model.pt") and _finite_weights(tmp_path / "last.pt")


def test_nan_steps_in_a_row_stop_training_naming_the_step(corpus, tmp_path, monkeypatch):
    forward = train_module.ObjectiveModule.forward
    monkeypatch.setattr(train_module.ObjectiveModule, "forward",
                        lambda self, batch: (lambda out: (out[0] * float("nan"), out[1]))(forward(self, batch)))
    # 2 steps an epoch here: the third non-finite step in a row is epoch 2's first.
    with pytest.raises(NonFiniteTraining, match=r"training stopped at epoch 2 step 1: .* 3 steps in a row"):
        train(dataclasses.replace(TINY, max_nonfinite_steps=3), corpus, tmp_path, progress=False)
    assert _strict_json_lines(tmp_path / "log.jsonl")[0]["skipped_steps"] == 2
    assert _finite_weights(tmp_path / "last.pt"), "epoch 1 skipped every step: its weights are the initial ones"


def test_a_diverging_learning_rate_is_a_one_line_error_and_saves_no_nonfinite_weights(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--out", str(out), "--quiet", "--lr", "1e6", "--clip", "0",
            "--epochs", "3", "--dim", "32", "--num-heads", "2", "--ffn-dim", "64", "--num-layers", "2",
            "--max-nonfinite-steps", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("dynenc train: error: training stopped ")
    assert len(error.strip().splitlines()) == 1
    for name in ("model.pt", "last.pt"):
        assert not (out / name).exists() or _finite_weights(out / name)
    if (out / "log.jsonl").exists():
        _strict_json_lines(out / "log.jsonl")


def test_an_init_checkpoint_of_another_model_is_a_one_line_error_naming_the_parameter(corpus, tmp_path, capsys):
    train(dataclasses.replace(TINY, epochs=1), corpus, tmp_path / "small", progress=False)
    argv = ["train", "--data", str(corpus), "--out", str(tmp_path / "wide"), "--quiet", "--epochs", "1",
            "--dim", "48", "--num-heads", "2", "--ffn-dim", "64", "--num-layers", "2",
            "--init", str(tmp_path / "small" / "model.pt")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert f"checkpoint {tmp_path / 'small' / 'model.pt'} does not match the model CTCModel: frontend." in error
    assert "has shape (32," in error and "and (48," in error


def test_killed_at_random_moments_and_resumed_a_run_ends_with_the_uninterrupted_weights(corpus, tmp_path):
    """SIGKILL ``dynenc train`` at seeded random moments of the epoch after a given one (mid-epoch,
    mid-save, between the saves of model.pt and last.pt, wherever they fall) and resume each
    time: the final weights and the log equal an uninterrupted run's."""
    from dynenc.config import save_config

    epochs = 8
    config = dataclasses.replace(TINY, epochs=epochs, spec_augment=True, method="layer_drop")
    save_config(config, tmp_path / "config.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def command(out, resume):
        return [sys.executable, "-m", "dynenc", "train", "--data", str(corpus), "--out", str(out), "--quiet",
                "--config", str(tmp_path / "config.json")] + (["--resume"] if resume else [])

    subprocess.run(command(tmp_path / "straight", False), check=True, env=env, timeout=300, capture_output=True)
    out = tmp_path / "killed"
    kills = kill_and_resume(command, out, (1, 3, 5), seed=0, env=env, resumable="last.pt")
    assert kills == 3, "every kill lands before the run ends"
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(out / "last.pt", weights_only=True)["model"]
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [record["epoch"] for record in _strict_json_lines(out / "log.jsonl")] == list(range(1, epochs + 1))
