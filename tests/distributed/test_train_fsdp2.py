"""``dynenc train --strategy fsdp2`` under torchrun (2 processes, gloo): random per-sample
masks train, sharded checkpoints resume bit-exactly and load into one process for eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynenc import cli
from dynenc.asr import load_checkpoint
from tone_corpus import write_tone_splits


def test_fsdp2_training_resumes_bit_exactly_and_evaluates(tmp_path):
    corpus = tmp_path / "speech"
    write_tone_splits(corpus, num_train=12, num_dev=2, num_test=2)
    script = Path(__file__).with_name("torchrun_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(corpus), str(tmp_path)], check=True, env=env, timeout=300)
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
    script = Path(__file__).with_name("torchrun_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(corpus), str(tmp_path), "nan", strategy], check=True, env=env, timeout=300)
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
    script = Path(__file__).with_name("torchrun_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with hold_run_directory(tmp_path / "nan"):  # the first job
        job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(corpus), str(tmp_path), "nan", "fsdp2"], env=env, timeout=300,
                             capture_output=True, text=True)
    assert job.returncode != 0
    for rank in (0, 1):  # both ranks stop on the same error: neither waits forever in a collective
        assert f"[rank{rank}]: dynenc.errors.RunDirectoryLocked: run directory {tmp_path / 'nan'} is in use" in \
            job.stderr, job.stderr[-3000:]
    assert not (tmp_path / "nan" / "log.jsonl").exists()
