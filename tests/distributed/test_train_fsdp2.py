"""``dynenc train --strategy fsdp2`` under torchrun (2 processes, gloo): random per-sample
masks train, sharded checkpoints resume bit-exactly and load into one process for eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killing import kill_and_resume
from tone_corpus import write_tone_splits

from dynenc import cli
from dynenc.asr import load_checkpoint


def _torchrun_train(corpus, out, *mode, check=True):
    """``torchrun --nproc-per-node 2 torchrun_train.py corpus out *mode`` (gloo, 1 thread a rank)."""
    script = Path(__file__).with_name("torchrun_train.py")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(corpus), str(out), *mode], check=check, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=not check, text=True)


def test_fsdp2_training_resumes_bit_exactly_and_evaluates(tmp_path):
    corpus = tmp_path / "speech"
    write_tone_splits(corpus, num_train=12, num_dev=2, num_test=2)
    _torchrun_train(corpus, tmp_path)
    straight, _ = load_checkpoint(tmp_path / "layer_drop" / "last.dcp")
    resumed, payload = load_checkpoint(tmp_path / "resumed" / "last.dcp")
    assert payload["model"].keys() == straight.state_dict().keys()
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2]
    out = tmp_path / "eval"
    assert cli.main(["eval", "--data", str(corpus), "--runs", str(tmp_path), "--methods", "layer_drop", "--out",
                     str(out), "--beam", "0", "--timing-repeats", "1", "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())["methods"]["layer_drop"]["rows"]
    assert rows and all(0 <= row["wer"] for row in rows)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_nan_loss_on_one_rank_is_skipped_by_every_rank(tmp_path, strategy):
    corpus = tmp_path / "speech"
    write_tone_splits(corpus, num_train=24, num_dev=2, num_test=2)
    _torchrun_train(corpus, tmp_path, "nan", strategy)
    records = [json.loads((tmp_path / "nan" / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [record["skipped_steps"] for record in records] == [1, 1], "the ranks skip the same step"
    log = (tmp_path / "nan" / "log.jsonl").read_text()
    assert "NaN" not in log and json.loads(log)["skipped_steps"] == 1
    model, _ = load_checkpoint(tmp_path / "nan" / ("last.dcp" if strategy == "fsdp2" else "last.pt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_rank_of_a_second_torchrun_job_is_refused_the_run_directory(tmp_path):
    from dynenc.runlock import hold_run_directory

    corpus = tmp_path / "speech"
    write_tone_splits(corpus, num_train=4, num_dev=2, num_test=2)
    with hold_run_directory(tmp_path / "nan"):  # the first job
        job = _torchrun_train(corpus, tmp_path, "nan", "fsdp2", check=False)
    assert job.returncode != 0
    for rank in (0, 1):  # both ranks stop on the same error: neither waits forever in a collective
        assert f"[rank{rank}]: dynenc.errors.RunDirectoryLocked: run directory {tmp_path / 'nan'} is in use" in \
            job.stderr, job.stderr[-3000:]
    assert not (tmp_path / "nan" / "log.jsonl").exists()


def test_a_2_rank_fsdp2_job_killed_at_random_moments_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL the whole torchrun job (launcher and ranks) at seeded moments of the epoch after
    a given one, resume each time: the sharded checkpoint equals an uninterrupted run's."""
    from dynenc.asr import ModelConfig
    from dynenc.asr.train import TrainConfig
    from dynenc.config import save_config

    corpus = tmp_path / "speech"
    write_tone_splits(corpus, num_train=16, num_dev=2, num_test=2)
    save_config(TrainConfig(method="layer_drop", strategy="fsdp2", epochs=6, max_frames=1500,
                            model=ModelConfig(dim=32, num_layers=4, num_heads=2, ffn_dim=64, kernel_size=5,
                                              dropout=0.0)), tmp_path / "config.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def command(out, resume):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dynenc",
                "train", "--data", str(corpus), "--out", str(out), "--quiet", "--config", str(tmp_path / "config.json")
                ] + (["--resume"] if resume else [])

    subprocess.run(command(tmp_path / "straight", False), check=True, env=env, timeout=300, capture_output=True)
    out = tmp_path / "killed"
    kills = kill_and_resume(command, out, (1, 3), seed=1, env=env, resumable="last.dcp")
    assert kills == 2
    straight, _ = load_checkpoint(tmp_path / "straight" / "last.dcp")
    resumed, _ = load_checkpoint(out / "last.dcp")
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == list(range(1, 7))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_diverging_learning_rate_stops_every_rank_alike_and_saves_no_nonfinite_weights(tmp_path, strategy):
    corpus = tmp_path / "speech"
    write_tone_splits(corpus, num_train=24, num_dev=2, num_test=2)
    _torchrun_train(corpus, tmp_path, "diverge", strategy)
    outcomes = [json.loads((tmp_path / "diverge" / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert outcomes[0] == outcomes[1], "every rank decides the same"
    assert outcomes[0]["error"].startswith("training stopped at epoch "), outcomes[0]
    last = tmp_path / "diverge" / ("last.dcp" if strategy == "fsdp2" else "last.pt")
    if last.exists():
        model, _ = load_checkpoint(last)
        assert all(torch.isfinite(p).all() for p in model.parameters())
