"""Tests for dynenc.asr.features: fbank, audio reading and the content-keyed feature cache.

The split tests use a small hand-written corpus (sine tones in the manifest layout of
recipes.synthetic_speech.corpus), so they run without espeak-ng.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dynenc.asr import features as F
from dynenc.asr.features import SAMPLE_RATE
from dynenc.asr.manifest import read_manifest

from tone_corpus import tone, write_tone_corpus

TEXTS = {"train": ["go left", "stop now please", "don't turn", "it's red"], "dev": ["yes", "five six"], "test": []}


@pytest.fixture
def corpus(tmp_path):
    return write_tone_corpus(tmp_path / "corpus", TEXTS)


def _cache_key(root, split):
    return torch.load(root / f"feats_{split}.pt", weights_only=True)["key"]


def _features_of(path):
    return F.compute_fbank(*F.read_audio(path))


def test_fbank_shape_and_normalisation():
    t = torch.arange(16000) / 16000
    wav = 0.5 * torch.sin(2 * torch.pi * 440 * t) + 0.01 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    f = F.compute_fbank(wav)
    assert f.shape == (98, 80) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert f.mean(0).abs().max() < 1e-4  # per-utterance mean removed
    # [1, N] and numpy input give the same features.
    assert torch.equal(F.compute_fbank(wav.unsqueeze(0).numpy()), f)
    with pytest.raises(ValueError, match="too short"):
        F.compute_fbank(torch.zeros(100))


def test_load_split_features_and_cache(corpus):
    out = corpus
    data = F.load_split(out, "train")
    texts = [r["text"] for r in read_manifest(out, "train")]
    assert [t for _, t in data] == texts
    for f, _ in data:
        assert f.dim() == 2 and f.shape[1] == 80 and f.shape[0] > 10
        assert f.dtype == torch.float32 and torch.isfinite(f).all()
    cache = out / "feats_train.pt"
    assert cache.is_file()
    torch.load(cache, weights_only=True)  # loads without pickled code
    mtime = cache.stat().st_mtime_ns
    again = F.load_split(out, "train")
    assert cache.stat().st_mtime_ns == mtime
    assert all(torch.equal(a, b) and ta == tb for (a, ta), (b, tb) in zip(data, again))


def test_load_split_names_bad_audio(corpus, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(corpus, work)
    (work / "feats_dev.pt").unlink(missing_ok=True)
    recs = read_manifest(work, "dev")
    bad = recs[0]["path"]
    with open(bad, "wb") as f:
        f.write(b"this is not a wav file")
    with pytest.raises(ValueError, match=bad.split("/")[-1]):
        F.load_split(work, "dev")
    missing = recs[1]["path"]
    os.remove(missing)
    (work / "dev.jsonl").write_text(json.dumps({**recs[1], "path": "wav/dev/dev_00001.wav"}) + "\n")
    with pytest.raises(ValueError, match="dev_00001.wav"):
        F.load_split(work, "dev")


@pytest.mark.parametrize(
    "replacement, keep_size_and_mtime",
    [
        pytest.param(lambda audio: audio[::-1], True, id="same-size-and-mtime"),
        pytest.param(lambda audio: np.concatenate([audio, audio]), False, id="longer"),
    ],
)
def test_replaced_wav_recomputes_features(corpus, replacement, keep_size_and_mtime):
    before = F.load_split(corpus, "train")
    path = read_manifest(corpus, "train")[1]["path"]
    stat = os.stat(path)
    audio, rate = sf.read(path, dtype="int16")
    sf.write(path, replacement(audio), rate, subtype="PCM_16")
    if keep_size_and_mtime:  # the replacement a size + mtime key would miss
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = F.load_split(corpus, "train")
    assert not torch.equal(after[1][0], before[1][0])
    assert torch.equal(after[1][0], _features_of(path))
    assert all(torch.equal(a, b) for i, ((a, _), (b, _)) in enumerate(zip(before, after)) if i != 1)


@pytest.mark.parametrize(
    "setting, value",
    [
        pytest.param("FEATURE_VERSION", F.FEATURE_VERSION + 1, id="feature-version"),
        pytest.param("SAMPLE_RATE", 8000, id="sample-rate"),
        pytest.param("FBANK_OPTIONS", {**F.FBANK_OPTIONS, "frame_shift": 20.0}, id="fbank-frame-shift"),
        pytest.param("FBANK_OPTIONS", {**F.FBANK_OPTIONS, "num_mel_bins": 40}, id="fbank-mel-bins"),
    ],
)
def test_feature_setting_change_recomputes(corpus, monkeypatch, setting, value):
    F.load_split(corpus, "train")
    old_key = _cache_key(corpus, "train")
    monkeypatch.setattr(F, setting, value)
    after = F.load_split(corpus, "train")
    assert _cache_key(corpus, "train") != old_key
    for (feats, _), rec in zip(after, read_manifest(corpus, "train")):
        assert torch.equal(feats, _features_of(rec["path"]))


def _write_garbage(path):
    path.write_bytes(b"this is not a wav file")


def _truncate_header(path):
    path.write_bytes(path.read_bytes()[:20])


def _write_no_samples(path):
    sf.write(str(path), np.zeros(0, dtype=np.int16), SAMPLE_RATE, subtype="PCM_16")


def _write_too_short(path):
    sf.write(str(path), tone(0, 0.005), SAMPLE_RATE, subtype="PCM_16")


@pytest.mark.parametrize(
    "damage, problem",
    [
        pytest.param(os.remove, "cannot read audio file .*No such file", id="missing-file"),
        pytest.param(_write_garbage, "could not read audio file", id="not-a-wav"),
        pytest.param(_truncate_header, "could not read audio file", id="truncated-header"),
        pytest.param(_write_no_samples, "is empty", id="no-samples"),
        pytest.param(_write_too_short, "too short for one 25 ms frame", id="shorter-than-one-frame"),
    ],
)
def test_bad_audio_names_utterance_and_problem(corpus, damage, problem):
    F.load_split(corpus, "dev")  # a valid cache must not hide the damage
    rec = read_manifest(corpus, "dev")[1]
    damage(Path(rec["path"]))
    with pytest.raises(ValueError, match=rf"dev\.jsonl: utterance 'dev_00001'.*{problem}") as error:
        F.load_split(corpus, "dev")
    assert rec["path"] in str(error.value), "the audio file is named"


@pytest.mark.parametrize(
    "text, character",
    [
        pytest.param("go 7", "'7'", id="digit"),
        pytest.param("stop!", "'!'", id="punctuation"),
        pytest.param("café", "'é'", id="non-ascii"),
    ],
)
def test_unencodable_transcript_names_utterance(tmp_path, text, character):
    root = write_tone_corpus(tmp_path / "corpus", {"train": ["go left", text]})
    problem = rf"train\.jsonl: utterance 'train_00001': transcript cannot be encoded: .*{character}"
    with pytest.raises(ValueError, match=problem):
        F.load_split(root, "train")
    assert not (root / "feats_train.pt").exists()  # rejected before any features were computed


@pytest.mark.parametrize(
    "line, problem",
    [
        pytest.param("{not json", "bad manifest line", id="not-json"),
        pytest.param('{"id": "train_00009", "path": "wav/x.wav"}', r"\['text'\] must be strings", id="no-text"),
        pytest.param("[1, 2]", "bad manifest line", id="not-an-object"),
    ],
)
def test_malformed_manifest_line_is_named(corpus, line, problem):
    manifest = corpus / "train.jsonl"
    first = manifest.read_text().splitlines()[0]
    manifest.write_text(f"{first}\n{line}\n")
    with pytest.raises(ValueError, match=rf"train\.jsonl:2: .*{problem}"):
        F.load_split(corpus, "train")
