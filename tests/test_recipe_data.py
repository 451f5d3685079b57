"""Tests for dynenc.recipe.data: synthetic corpus, features, tokenizer, CTC batches."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dynenc.recipe import data as D

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng not installed (apt-get install -y espeak-ng); corpus synthesis tests skipped",
)

COUNTS = {"train": 8, "dev": 2, "test": 4}
FIELDS = {"path", "text", "duration", "voice", "speed", "pitch"}


def _synth(out_dir, seed=0):
    return D.synthesize_corpus(
        out_dir, COUNTS["train"], COUNTS["dev"], COUNTS["test"], seed=seed, workers=2, progress=False
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install -y espeak-ng)")
    out = tmp_path_factory.mktemp("corpus")
    manifests = _synth(out)
    return out, manifests


# ------------------------------------------------------------------ corpus


@needs_espeak
def test_manifests_counts_and_fields(corpus):
    out, manifests = corpus
    assert set(manifests) == set(D.SPLITS)
    for split, path in manifests.items():
        assert path.is_file()
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(recs) == COUNTS[split]
        for r in recs:
            assert FIELDS <= set(r)
            assert (out / r["path"]).is_file()
            words = r["text"].split()
            assert D.MIN_WORDS <= len(words) <= D.MAX_WORDS
            assert set(words) <= set(D.VOCABULARY)
            assert D.SPEED_RANGE[0] <= r["speed"] <= D.SPEED_RANGE[1]
            assert D.PITCH_RANGE[0] <= r["pitch"] <= D.PITCH_RANGE[1]
            assert r["voice"] in D.voices_for_split(split)
    assert json.loads((out / "config.json").read_text())["seed"] == 0


@needs_espeak
def test_wavs_are_16k_mono_nonsilent(corpus):
    out, _ = corpus
    for split in D.SPLITS:
        for r in D.read_manifest(out, split):
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
    seen = {r["voice"] for s in ("train", "dev") for r in D.read_manifest(out, s)}
    test = {r["voice"] for r in D.read_manifest(out, "test")}
    assert seen.isdisjoint(test)
    # Held out by construction in both factors (accent and variant), not just by pair.
    train_all = set(D.voices_for_split("train"))
    assert train_all.isdisjoint(D.voices_for_split("test"))
    assert set(D.TRAIN_ACCENTS).isdisjoint(D.TEST_ACCENTS)
    assert set(D.TRAIN_VARIANTS).isdisjoint(D.TEST_VARIANTS)
    assert D.voices_for_split("dev") == D.voices_for_split("train")


@needs_espeak
def test_deterministic_across_dirs_and_workers(corpus, tmp_path):
    out, _ = corpus
    other = tmp_path / "again"
    # Different worker count must not change anything.
    D.synthesize_corpus(other, COUNTS["train"], COUNTS["dev"], COUNTS["test"], seed=0, workers=1, progress=False)
    for split in D.SPLITS:
        a, b = D.read_manifest(out, split), D.read_manifest(other, split)
        strip = lambda recs: [{k: v for k, v in r.items() if k != "path"} for r in recs]  # noqa: E731
        assert strip(a) == strip(b)
        for ra, rb in zip(a, b):
            with open(ra["path"], "rb") as fa, open(rb["path"], "rb") as fb:
                assert fa.read() == fb.read(), ra["path"]


@needs_espeak
def test_seed_changes_corpus(corpus, tmp_path):
    out, _ = corpus
    D.synthesize_corpus(tmp_path, 4, 0, 0, seed=1, progress=False)
    a = [r["text"] for r in D.read_manifest(out, "train")[:4]]
    b = [r["text"] for r in D.read_manifest(tmp_path, "train")]
    assert a != b
    assert D.read_manifest(tmp_path, "dev") == []


@needs_espeak
def test_cache_hit_does_not_rewrite(corpus):
    out, manifests = corpus
    files = [out / "config.json", *manifests.values()]
    files += [Path(r["path"]) for r in D.read_manifest(out, "train")]
    before = {f: f.stat().st_mtime_ns for f in files}
    assert _synth(out) == manifests
    assert {f: f.stat().st_mtime_ns for f in files} == before


@needs_espeak
def test_config_change_regenerates(tmp_path):
    D.synthesize_corpus(tmp_path, 2, 1, 1, seed=0, progress=False)
    D.synthesize_corpus(tmp_path, 3, 1, 1, seed=0, progress=False)
    assert len(D.read_manifest(tmp_path, "train")) == 3
    assert json.loads((tmp_path / "config.json").read_text())["num_utterances"]["train"] == 3


def test_missing_espeak_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        D.synthesize_corpus(tmp_path, 1, 0, 0, progress=False)


# ---------------------------------------------------------------- features


def test_fbank_shape_and_normalisation():
    t = torch.arange(16000) / 16000
    wav = 0.5 * torch.sin(2 * torch.pi * 440 * t) + 0.01 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    f = D.compute_fbank(wav)
    assert f.shape == (98, 80) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert f.mean(0).abs().max() < 1e-4  # per-utterance mean removed
    # [1, N] and numpy input give the same features.
    assert torch.equal(D.compute_fbank(wav.unsqueeze(0).numpy()), f)
    with pytest.raises(ValueError, match="too short"):
        D.compute_fbank(torch.zeros(100))


@needs_espeak
def test_load_split_features_and_cache(corpus):
    out, _ = corpus
    data = D.load_split(out, "train")
    texts = [r["text"] for r in D.read_manifest(out, "train")]
    assert [t for _, t in data] == texts
    for f, _ in data:
        assert f.dim() == 2 and f.shape[1] == 80 and f.shape[0] > 10
        assert f.dtype == torch.float32 and torch.isfinite(f).all()
    cache = out / "feats_train.pt"
    assert cache.is_file()
    torch.load(cache, weights_only=True)  # loads without pickled code
    mtime = cache.stat().st_mtime_ns
    again = D.load_split(out, "train")
    assert cache.stat().st_mtime_ns == mtime
    assert all(torch.equal(a, b) and ta == tb for (a, ta), (b, tb) in zip(data, again))


@needs_espeak
def test_load_split_names_bad_audio(corpus, tmp_path):
    out, _ = corpus
    work = tmp_path / "c"
    shutil.copytree(out, work)
    (work / "feats_dev.pt").unlink(missing_ok=True)
    recs = D.read_manifest(work, "dev")
    bad = recs[0]["path"]
    with open(bad, "wb") as f:
        f.write(b"this is not a wav file")
    with pytest.raises(RuntimeError, match=bad.split("/")[-1]):
        D.load_split(work, "dev")
    missing = recs[1]["path"]
    os.remove(missing)
    (work / "dev.jsonl").write_text(json.dumps({**recs[1], "path": "wav/dev/dev_00001.wav"}) + "\n")
    with pytest.raises(FileNotFoundError, match="dev_00001.wav"):
        D.load_split(work, "dev")


# --------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_errors():
    tok = D.CharTokenizer()
    assert tok.vocab_size == 29 and tok.blank == 0
    text = "don't turn left it's zero"
    ids = tok.encode(text)
    assert 0 not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode(" ") == [1] and tok.encode("'") == [2] and tok.encode("az") == [3, 28]
    assert tok.encode("GO") == tok.encode("go")
    for w in D.VOCABULARY:  # every corpus word must be encodable
        assert tok.decode(tok.encode(w)) == w
    with pytest.raises(ValueError, match=r"'7'"):
        tok.encode("go 7")
    with pytest.raises(ValueError, match=r"'!'"):
        tok.encode("stop!")
    with pytest.raises(ValueError):
        tok.decode([29])
    # Greedy CTC path: blanks separate repeats.
    path = [0, 9, 9, 0, 6, 0, 14, 14, 0, 14, 17, 0]  # g g _ d _ l l _ l o
    assert tok.decode_ctc(path) == "gdllo"
    assert tok.decode_ctc(torch.tensor(path)) == "gdllo"


# ----------------------------------------------------------------- batches


def _fake_data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["go", "left", "stop", "don't"]
    out = []
    for i in range(n):
        t = int(torch.randint(20, 200, (1,), generator=g))
        out.append((torch.randn(t, 80, generator=g), " ".join(words[: 1 + i % 4])))
    return out


def test_collate_shapes_and_ctc_loss():
    tok = D.CharTokenizer()
    items = _fake_data(5)
    feats, flens, targets, tlens = D.collate_batch(items, tok)
    assert feats.shape == (5, max(f.shape[0] for f, _ in items), 80) and feats.dtype == torch.float32
    assert flens.dtype == tlens.dtype == targets.dtype == torch.int64
    assert flens.tolist() == [f.shape[0] for f, _ in items]
    assert tlens.tolist() == [len(t) for _, t in items]
    assert targets.shape == (int(tlens.sum()),)
    for b, (f, _) in enumerate(items):
        assert torch.equal(feats[b, : f.shape[0]], f)
        assert (feats[b, f.shape[0]:] == 0).all()
    split = torch.split(targets, tlens.tolist())
    assert [tok.decode(s) for s in split] == [t for _, t in items]
    # The batch plugs straight into ctc_loss.
    log_probs = torch.randn(feats.shape[1], 5, tok.vocab_size).log_softmax(-1)
    loss = torch.nn.functional.ctc_loss(log_probs, targets, flens, tlens, blank=tok.blank)
    assert torch.isfinite(loss)
    # Pre-tokenised targets are accepted too.
    assert torch.equal(D.collate_batch([(f, tok.encode(t)) for f, t in items])[2], targets)


def test_speech_batches_bucketing_and_seeding():
    data = _fake_data(23)
    tok = D.CharTokenizer()
    sb = D.SpeechBatches(data, tok, batch_size=4, shuffle=True, sort_by_length=True, seed=3, pool_batches=2)
    idx = sb.batch_indices()
    assert sorted(i for b in idx for i in b) == list(range(23))  # every item once
    assert idx == D.SpeechBatches(data, tok, batch_size=4, seed=3, pool_batches=2).batch_indices()
    sb.set_epoch(1)
    assert sb.batch_indices() != idx
    batches = list(sb)
    assert len(batches) == len(sb) == 6
    assert all(b[0].shape[0] == len(b[1]) for b in batches)
    # Frame budget: padded size per batch stays within max_frames.
    sb = D.SpeechBatches(data, tok, max_frames=600, shuffle=False)
    lens = [data[i][0].shape[0] for b in sb.batch_indices() for i in b]
    assert lens == sorted(lens)  # no shuffle + sort = global length order
    for feats, flens, _, _ in sb:
        assert feats.shape[0] * feats.shape[1] <= 600 or feats.shape[0] == 1
    # drop_last with fixed batches
    sb = D.SpeechBatches(data, tok, batch_size=4, shuffle=False, sort_by_length=False, drop_last=True)
    assert [len(b) for b in sb.batch_indices()] == [4] * 5
