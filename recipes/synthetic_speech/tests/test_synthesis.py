"""Tests for recipes.synthetic_speech.synthesis: engines, speakers, reverberation, manifests, statistics,
determinism and the cache of the v2 corpus."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from recipes.synthetic_speech import synthesis as S
from dynenc.asr.manifest import SPLITS, read_manifest
from recipes.synthetic_speech.corpus import corpus_statistics
from dynenc.asr.features import load_split
from recipes.synthetic_speech.sentences import MAX_WORDS, MIN_WORDS, VOCABULARY

_EXECUTABLES = ("espeak-ng", "flite", "festival", "text2wave")
needs_espeak = pytest.mark.skipif(
    any(shutil.which(e) is None for e in _EXECUTABLES),
    reason="speech engines not installed (make speech-engines); corpus synthesis tests skipped",
)

COUNTS = {"train": 8, "dev": 2, "test": 4}
FIELDS = {"path", "text", "duration", "speaker", "engine", "voice", "tempo", "pitch", "rt60", "snr_db"}


def _synth(out_dir, seed=0):
    return S.synthesize_corpus(
        out_dir, COUNTS["train"], COUNTS["dev"], COUNTS["test"], seed=seed, workers=2, progress=False
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if any(shutil.which(e) is None for e in _EXECUTABLES):
        pytest.skip("speech engines not installed (make speech-engines)")
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
            assert MIN_WORDS <= len(words) <= MAX_WORDS
            assert set(words) <= set(VOCABULARY)
            assert S.TEMPO_RANGE[0] <= r["tempo"] <= S.TEMPO_RANGE[1]
            assert S.PITCH_RANGE[0] <= r["pitch"] <= S.PITCH_RANGE[1]
            assert r["rt60"] is None or S.RT60_RANGE_S[0] <= r["rt60"] <= S.RT60_RANGE_S[1]
            assert r["speaker"] == f"{r['engine']}:{r['voice']}"
            assert r["speaker"] in S.speakers_for_split(split)
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
def test_test_speakers_held_out_in_corpus(corpus):
    out, _ = corpus
    seen = {r["speaker"] for s in ("train", "dev") for r in read_manifest(out, s)}
    test = {r["speaker"] for r in read_manifest(out, "test")}
    assert test and seen.isdisjoint(test)


@pytest.mark.parametrize("engine", [pytest.param(e, id=e) for e in S.ENGINES])
def test_test_voices_held_out_by_construction(engine):
    train = set(S.split_voices("train")[engine])
    test = set(S.split_voices("test")[engine])
    assert train and test and train.isdisjoint(test)
    assert S.split_voices("dev") == S.split_voices("train")
    # rms is a speaker no engine trains on; festival's diphone engine is never trained on.
    assert not any(s.endswith(":rms") or s.startswith("festival:kal") for s in S.speakers_for_split("train"))
    # espeak: held out in both factors (accent and variant), not just by pair.
    assert set(S.TRAIN_ACCENTS).isdisjoint(S.TEST_ACCENTS)
    assert set(S.TRAIN_VARIANTS).isdisjoint(S.TEST_VARIANTS)


def test_engine_weights_cover_every_engine():
    for split, weights in S.ENGINE_WEIGHTS.items():
        assert set(weights) == set(S.ENGINES), split
        assert abs(sum(weights.values()) - 1.0) < 1e-9 and min(weights.values()) >= 0.2


def test_plans_draw_every_engine_and_reverb_about_half():
    """Plans only (no audio): engine shares and the reverberated fraction match the design."""
    plans = [S._plan_utterance(0, "test", i)[0] for i in range(600)]
    shares = {e: sum(p["engine"] == e for p in plans) / len(plans) for e in S.ENGINES}
    assert all(abs(share - 1 / 3) < 0.08 for share in shares.values()), shares
    reverb = sum(p["rt60"] is not None for p in plans) / len(plans)
    assert 0.4 < reverb < 0.6
    assert {p["speaker"] for p in plans} == set(S.speakers_for_split("test"))


def _voices_of_every_engine():
    return [pytest.param(e, v, id=f"{e}:{v}") for e in S.ENGINES
            for v in (S.split_voices("train")[e][0], S.split_voices("test")[e][0])]


@needs_espeak
@pytest.mark.parametrize("engine, voice", _voices_of_every_engine())
def test_engine_synthesises_nonsilent_audio(engine, voice):
    e = S.make_engine(engine)
    assert e.version()
    audio, rate = e.synthesize("the quiet farmer painted a fence", voice, tempo=1.1, pitch=0.9)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert rate in (8000, 16000, 22050, 32000, 48000)
    assert 0.5 < len(audio) / rate < 6.0
    assert np.sqrt(np.mean(audio**2)) > 0.01
    slow, rate2 = e.synthesize("the quiet farmer painted a fence", voice, tempo=0.8, pitch=0.9)
    assert rate2 == rate and len(slow) > len(audio)  # the engine-native rate is applied


@needs_espeak
def test_corpus_has_every_engine_at_16k(corpus):
    out, _ = corpus
    engines = {r["engine"] for s in SPLITS for r in read_manifest(out, s)}
    assert engines == set(S.ENGINES)


def test_reverberation_changes_signal_and_keeps_length():
    x = torch.zeros(8000, dtype=torch.float64)
    x[100] = 1.0  # impulse: the output is the room response itself
    x[4000:4400] = torch.sin(torch.arange(400) * 0.3)
    y = S.reverberate(x, 0.3, 6.0, np.random.default_rng(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(x, y)
    assert y[100] == pytest.approx(1.0)  # the direct path is kept
    assert y[100 + 33 + 1000].abs() > 0  # the tail rings after the impulse (2 ms pre-delay)
    tail = y[102:4000]
    # energy of the reverberant part relative to the direct path is the drawn DRR
    assert 10 * torch.log10(1.0 / tail.pow(2).sum()) == pytest.approx(6.0, abs=0.5)
    again = S.reverberate(x, 0.3, 6.0, np.random.default_rng(0))
    assert torch.equal(y, again)


@needs_espeak
def test_statistics_match_manifests(corpus):
    out, _ = corpus
    stats = json.loads((out / "stats.json").read_text())
    assert stats == corpus_statistics(out)
    assert stats["vocabulary_size"] == len(VOCABULARY)
    assert (out / "vocabulary.txt").read_text().split() == list(VOCABULARY)
    for split in SPLITS:
        recs = read_manifest(out, split)
        st = stats["splits"][split]
        words = [w for r in recs for w in r["text"].split()]
        assert st["utterances"] == COUNTS[split]
        assert st["hours"] == pytest.approx(sum(r["duration"] for r in recs) / 3600, abs=1e-4)
        assert st["words"] == len(words) and st["distinct_words"] == len(set(words))
        assert st["speakers"]["list"] == sorted({r["speaker"] for r in recs})
        assert st["speakers"]["count"] == len(st["speakers"]["list"])
        assert sum(st["engines"].values()) == COUNTS[split]
        assert st["reverberated"] == pytest.approx(sum(r["rt60"] is not None for r in recs) / len(recs), abs=1e-4)
        assert st["snr_db"] == [min(r["snr_db"] for r in recs), max(r["snr_db"] for r in recs)]
        assert S.SNR_RANGE_DB[0] <= st["snr_db"][0] <= st["snr_db"][1] <= S.SNR_RANGE_DB[1]
        assert S.TEMPO_RANGE[0] <= st["tempo"][0] <= st["tempo"][1] <= S.TEMPO_RANGE[1]
    assert stats["held_out_speakers"] == stats["splits"]["test"]["speakers"]["list"]


@pytest.mark.parametrize(
    "engine, voice, error, message",
    [
        pytest.param("mbrola", None, ValueError, r"unknown synthesis engine 'mbrola'", id="unknown-engine"),
        pytest.param("flite", "awb_time", ValueError, r"unknown flite voice 'awb_time'", id="flite-limited-domain"),
        pytest.param("flite", "nobody", ValueError, r"unknown flite voice 'nobody'", id="flite-unknown-voice"),
        pytest.param("festival", "nobody", ValueError, r"unknown festival voice 'nobody'", id="festival-unknown-voice"),
        pytest.param("espeak", "xx-nobody", RuntimeError, r"espeak-ng \(voice='xx-nobody' text='go'\) failed",
                     id="espeak-unknown-voice"),
    ],
)
def test_bad_engine_or_voice_is_named(engine, voice, error, message):
    if engine in S.ENGINES and any(shutil.which(e) is None for e in _EXECUTABLES):
        pytest.skip("speech engines not installed")
    with pytest.raises(error, match=message):
        S.make_engine(engine).synthesize("go", voice)


def test_hanging_engine_times_out(monkeypatch):
    monkeypatch.setattr(S, "SYNTH_TIMEOUT_S", 0.2)
    with pytest.raises(RuntimeError, match=r"sleep \(voice='v' text='t'\) did not finish within 0.2 s"):
        S._run_engine("sleep", ["sleep", "5"], "v", "t")


@pytest.mark.parametrize("executable, packages", [
    pytest.param("espeak-ng", "espeak-ng", id="espeak"),
    pytest.param("flite", "flite", id="flite"),
    pytest.param("text2wave", "festival festvox-kallpc16k festvox-us-slt-hts", id="festival"),
])
def test_missing_engine_names_executable_and_apt(monkeypatch, executable, packages):
    real = shutil.which
    monkeypatch.setattr(S.shutil, "which", lambda name: None if name == executable else real(name))
    name = {"espeak-ng": "espeak", "flite": "flite", "text2wave": "festival"}[executable]
    with pytest.raises(ValueError, match=rf"{executable} is not on PATH.*apt-get install -y {packages}"):
        S.make_engine(name)


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
