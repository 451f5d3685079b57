"""Tests for recipes.synthetic_speech.data, the ``python -m recipes.synthetic_speech data`` command: flag checks and a tiny run."""
import argparse
import json
import shutil

import pytest

from recipes.synthetic_speech import data, synthesis
from dynenc.asr.manifest import SPLITS
from recipes.synthetic_speech.reproduce import RecipePlan


def _run(*argv):
    parser = argparse.ArgumentParser(prog="python -m recipes.synthetic_speech data")
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


@pytest.mark.skipif(any(shutil.which(e) is None for e in ("espeak-ng", "flite", "text2wave")),
                    reason="speech engines not installed (make speech-engines)")
def test_tiny_corpus_with_features(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert _run("--out-dir", str(out), "--num-train", "2", "--num-dev", "1", "--num-test", "1",
                "--workers", "1", "--units", "bpe32", "--quiet") == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in printed[:3]] == [f"{split}: {out / f'{split}.jsonl'}" for split in SPLITS]
    assert "(2 utterances, " in printed[0]
    assert printed[3] == f"stats: {out / 'stats.json'}"
    assert all((out / f"feats_{split}.pt").is_file() for split in SPLITS)
    assert json.loads((out / "units.json").read_text())["units"] == "bpe32" and (out / "units.model").is_file()


@pytest.mark.parametrize("units", ["words", "bpe2"])
def test_bad_units_are_named(tmp_path, units):
    out = tmp_path / "corpus"
    with pytest.raises(ValueError, match=rf"units must be 'char' or 'bpe<N>'.*got '{units}'"):
        _run("--out-dir", str(out), "--units", units, "--quiet")
    assert not out.exists()


def test_default_corpus_size():
    parser = argparse.ArgumentParser(prog="python -m recipes.synthetic_speech data")
    data.add_arguments(parser)
    a = parser.parse_args([])
    plan = RecipePlan()
    assert (a.num_train, a.num_dev, a.num_test, a.units) == (plan.num_train, plan.num_dev, plan.num_test, plan.units)


def test_every_recipe_flag_has_help_text():
    import importlib

    from recipes.synthetic_speech.cli import COMMANDS

    for command, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        missing = [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]
        assert not missing, command
