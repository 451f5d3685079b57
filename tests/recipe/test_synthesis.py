"""Tests for dynenc.recipe.synthesis: the espeak-ng corpus (voices, manifests, determinism, cache)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dynenc.recipe import synthesis as S
from dynenc.recipe.corpus import SPLITS, read_manifest
from dynenc.recipe.features import load_split

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng not installed (apt-get install -y espeak-ng); corpus synthesis tests skipped",
)

COUNTS = {"train": 8, "dev": 2, "test": 4}
FIELDS = {"path", "text", "duration", "voice", "speed", "pitch"}


def _synth(out_dir, seed=0):
    return S.synthesize_corpus(
        out_dir, COUNTS["train"], COUNTS["dev"], COUNTS["test"], seed=seed, workers=2, progress=False
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install -y espeak-ng)")
    out = tmp_path_factory.mktemp("corpus")
    manifests = _synth(out)
    return out, manifests


@needs_espeak
def test_manifests_counts_and_fields(corpus):
    out, manifests = corpus
    assert set(manifests) == set(SPLITS)
    for split, path in manifests.items():
        assert path.is_file()
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(recs) == COUNTS[split]
        for r in recs:
            assert FIELDS <= set(r)
            assert (out / r["path"]).is_file()
            words = r["text"].split()
            assert S.MIN_WORDS <= len(words) <= S.MAX_WORDS
            assert set(words) <= set(S.VOCABULARY)
            assert S.SPEED_RANGE[0] <= r["speed"] <= S.SPEED_RANGE[1]
            assert S.PITCH_RANGE[0] <= r["pitch"] <= S.PITCH_RANGE[1]
            assert r["voice"] in S.voices_for_split(split)
    assert json.loads((out / "config.json").read_text())["seed"] == 0


@needs_espeak
def test_wavs_are_16k_mono_nonsilent(corpus):
    out, _ = corpus
    for split in SPLITS:
        for r in read_manifest(out, split):
            info = sf.info(r["path"])
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            audio, _ = sf.read(r["path"], dtype="float32")
            assert audio.ndim == 1
            assert abs(len(audio) / 16000 - r["duration"]) < 1e-3
            assert np.sqrt(np.mean(audio**2)) > 0.01  # speech, not silence/noise floor
            assert np.abs(audio).max() < 1.0


@needs_espeak
def test_test_voices_held_out(corpus):
    out, _ = corpus
    seen = {r["voice"] for s in ("train", "dev") for r in read_manifest(out, s)}
    test = {r["voice"] for r in read_manifest(out, "test")}
    assert seen.isdisjoint(test)
    # Held out by construction in both factors (accent and variant), not just by pair.
    train_all = set(S.voices_for_split("train"))
    assert train_all.isdisjoint(S.voices_for_split("test"))
    assert set(S.TRAIN_ACCENTS).isdisjoint(S.TEST_ACCENTS)
    assert set(S.TRAIN_VARIANTS).isdisjoint(S.TEST_VARIANTS)
    assert S.voices_for_split("dev") == S.voices_for_split("train")


@needs_espeak
def test_deterministic_across_dirs_and_workers(corpus, tmp_path):
    out, _ = corpus
    other = tmp_path / "again"
    # Different worker count must not change anything.
    S.synthesize_corpus(other, COUNTS["train"], COUNTS["dev"], COUNTS["test"], seed=0, workers=1, progress=False)
    for split in SPLITS:
        a, b = read_manifest(out, split), read_manifest(other, split)
        strip = lambda recs: [{k: v for k, v in r.items() if k != "path"} for r in recs]  # noqa: E731
        assert strip(a) == strip(b)
        for ra, rb in zip(a, b):
            with open(ra["path"], "rb") as fa, open(rb["path"], "rb") as fb:
                assert fa.read() == fb.read(), ra["path"]


@needs_espeak
def test_seed_changes_corpus(corpus, tmp_path):
    out, _ = corpus
    S.synthesize_corpus(tmp_path, 4, 0, 0, seed=1, progress=False)
    a = [r["text"] for r in read_manifest(out, "train")[:4]]
    b = [r["text"] for r in read_manifest(tmp_path, "train")]
    assert a != b
    assert read_manifest(tmp_path, "dev") == []


@needs_espeak
def test_cache_hit_does_not_rewrite(corpus):
    out, manifests = corpus
    files = [out / "config.json", *manifests.values()]
    files += [Path(r["path"]) for r in read_manifest(out, "train")]
    before = {f: f.stat().st_mtime_ns for f in files}
    assert _synth(out) == manifests
    assert {f: f.stat().st_mtime_ns for f in files} == before


@needs_espeak
def test_config_change_regenerates(tmp_path):
    S.synthesize_corpus(tmp_path, 2, 1, 1, seed=0, progress=False)
    S.synthesize_corpus(tmp_path, 3, 1, 1, seed=0, progress=False)
    assert len(read_manifest(tmp_path, "train")) == 3
    assert json.loads((tmp_path / "config.json").read_text())["num_utterances"]["train"] == 3


@needs_espeak
def test_synthesised_corpus_loads_as_features(corpus):
    """End to end: every split of a synthesised corpus becomes 80-dim fbank + its transcripts."""
    out, _ = corpus
    for split in SPLITS:
        data = load_split(out, split)
        assert [t for _, t in data] == [r["text"] for r in read_manifest(out, split)]
        assert all(f.shape[1] == 80 and f.shape[0] > 10 and torch.isfinite(f).all() for f, _ in data)


def test_missing_espeak_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="apt-get install -y espeak-ng"):
        S.synthesize_corpus(tmp_path, 1, 0, 0, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"num_train": -1}, r"num_train must be an integer >= 0, got -1", id="negative-num-train"),
        pytest.param({"num_dev": 1.5}, r"num_dev must be an integer >= 0, got 1.5", id="fractional-num-dev"),
        pytest.param({"num_test": "3"}, r"num_test must be an integer >= 0, got '3'", id="string-num-test"),
        pytest.param({"seed": -2}, r"seed must be an integer >= 0, got -2", id="negative-seed"),
        pytest.param({"workers": 0}, r"workers must be an integer >= 1, got 0", id="zero-workers"),
    ],
)
def test_bad_parameters_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        S.synthesize_corpus(tmp_path / "corpus", **{"num_train": 1, "num_dev": 0, "num_test": 0, **kwargs})
    assert not (tmp_path / "corpus").exists()  # rejected before anything is written


@needs_espeak
def test_unwritable_out_dir_parameter_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"out_dir must be a writable directory, got '.*a_file/corpus'"):
        S.synthesize_corpus(blocker / "corpus", 1, 0, 0, progress=False)
