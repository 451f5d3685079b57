"""Tests for dynenc.recipe.data, the ``dynenc data`` command: flag checks and a tiny run."""
import argparse
import shutil

import pytest

from dynenc.recipe import data, synthesis
from dynenc.recipe.corpus import SPLITS


def _run(*argv):
    parser = argparse.ArgumentParser(prog="dynenc data")
    data.add_arguments(parser)
    return data.run(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        pytest.param("--num-train", "-1", ">= 0", id="negative-num-train"),
        pytest.param("--num-dev", "-5", ">= 0", id="negative-num-dev"),
        pytest.param("--num-test", "-2", ">= 0", id="negative-num-test"),
        pytest.param("--seed", "-3", ">= 0", id="negative-seed"),
        pytest.param("--workers", "0", ">= 1", id="zero-workers"),
        pytest.param("--workers", "-4", ">= 1", id="negative-workers"),
    ],
)
def test_bad_flag_names_flag_value_and_expectation(tmp_path, flag, value, expected):
    out = tmp_path / "corpus"
    with pytest.raises(ValueError, match=rf"^{flag} must be an integer {expected}, got {value}$"):
        _run("--out-dir", str(out), flag, value, "--quiet")
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize("below", [pytest.param("", id="out-dir-is-a-file"),
                                   pytest.param("corpus", id="out-dir-under-a-file")])
def test_unwritable_out_dir_flag_is_named(tmp_path, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / below if below else blocker
    with pytest.raises(ValueError, match=rf"^--out-dir must be a writable directory, got '{out}': "):
        _run("--out-dir", str(out), "--quiet")


def test_missing_espeak_is_a_value_error(tmp_path, monkeypatch):
    monkeypatch.setattr(synthesis.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="espeak-ng is not on PATH.*apt-get install -y espeak-ng"):
        _run("--out-dir", str(tmp_path / "corpus"), "--quiet")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_tiny_corpus_with_features(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert _run("--out-dir", str(out), "--num-train", "2", "--num-dev", "1", "--num-test", "1",
                "--workers", "1", "--quiet") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{split}: {out / f'{split}.jsonl'}" for split in SPLITS]
    assert all((out / f"feats_{split}.pt").is_file() for split in SPLITS)
