"""Synthesis of the speech corpus (v2): engines, speakers, reverberation, manifests.

The corpus is synthesised locally so the recipe needs no downloads.  Each utterance is a
sentence of :mod:`recipes.synthetic_speech.sentences` (3-9 words, >= 1,000-word vocabulary) spoken by
one *speaker* ``engine:voice`` at a random tempo and pitch, optionally reverberated with a
synthetic room impulse response, at a random level with light white noise.

Engines (:data:`ENGINES`, all Debian packages): ``espeak`` (espeak-ng; voices keep their
``accent+variant`` names), ``flite`` and ``festival`` (``text2wave``).  Each has
``version()`` and ``synthesize(text, voice, tempo, pitch) -> (samples, rate)``.

Speakers and the held-out test: train and dev draw from espeak :data:`TRAIN_ACCENTS` x
:data:`TRAIN_VARIANTS`, flite kal/kal16/awb/slt and festival cmu_us_slt_arctic_hts; test
draws only from voices never used in training: espeak :data:`TEST_ACCENTS` x
:data:`TEST_VARIANTS`, flite rms (a speaker no engine trains on) and festival kal_diphone
(festival's diphone engine, never trained on, for a speaker flite's kal voices train on).
Why not hold out slt: it is the only female non-espeak speaker, and corpus v2's first split
(slt through flite and festival in test) left training with male natural-speech voices
only; every model scored ~100 % WER on slt, so two thirds of that test measured one gap
and nothing about the methods.  flite's awb_time is not used: it is a limited-domain
(talking clock) voice that cannot say arbitrary text (a 10-word sentence comes out ~1 s
long), so its transcripts would be wrong.

Engine weights (:data:`ENGINE_WEIGHTS`): train/dev espeak 0.4, flite 0.4, festival 0.2 --
espeak and flite are fast and give many voices; festival (~0.3 s per call just to start)
has one training voice, so a fifth of the data already gives it ~10x the utterances per
voice of any espeak voice.  Test is a third per engine, so each held-out engine/voice
family gets a WER of its own.

Variation: tempo in :data:`TEMPO_RANGE` (engine-native rate: espeak ``-s``, flite
``duration_stretch``, festival ``Duration_Stretch`` / HTS ``-r``); pitch in
:data:`PITCH_RANGE` where cheap (espeak ``-p``, flite ``int_f0_target_mean`` -- ignored by
rms --, festival HTS ``-fm``; kal_diphone keeps its pitch).  Half of the utterances
(:data:`REVERB_PROBABILITY`) are reverberated (:func:`reverberate`); all get white noise at
an SNR in :data:`SNR_RANGE_DB`.

The files written are described in :mod:`recipes.synthetic_speech.corpus`.

Typical use::

    paths = synthesize_corpus("data/speech")            # {"train": Path(...jsonl), ...}
    corpus_statistics("data/speech")                    # also in data/speech/stats.json
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from dynenc.fileio import atomic_write, json_writer
from dynenc.asr.features import SAMPLE_RATE, resample, torch_threads
from dynenc.asr.manifest import (SPLITS, check_split, feature_cache_path, manifest_path, prepare_output_dir,
                                 read_manifest)

from .corpus import corpus_statistics, stats_path, vocabulary_path
from .sentences import MAX_WORDS, MIN_WORDS, TEMPLATES, VOCABULARY, WORD_CLASSES, sentence

__all__ = [
    "CORPUS_VERSION",
    "VOCABULARY",
    "TRAIN_ACCENTS",
    "TRAIN_VARIANTS",
    "TEST_ACCENTS",
    "TEST_VARIANTS",
    "ENGINES",
    "ENGINE_WEIGHTS",
    "EspeakNG",
    "Flite",
    "Festival",
    "make_engine",
    "split_voices",
    "speakers_for_split",
    "reverberate",
    "check_int_at_least",
    "synthesize_corpus",
    "corpus_statistics",
]

# Bump whenever the synthesis procedure changes, so stale caches are rebuilt.
CORPUS_VERSION = 3  # 3: held-out voices rms + kal_diphone (was slt)

# Fixed per-split codes (not hash(split): Python salts str hashes per process).
_SPLIT_CODE = {"train": 0, "dev": 1, "test": 2}

TEMPO_RANGE = (0.8, 1.25)   # speaking-rate factor, > 1 is faster
PITCH_RANGE = (0.85, 1.15)  # factor on the voice's mean F0
SNR_RANGE_DB = (25.0, 35.0)
PEAK_RANGE = (0.3, 0.9)     # random output level; also keeps noisy audio below clipping
REVERB_PROBABILITY = 0.5
RT60_RANGE_S = (0.15, 0.5)
DRR_RANGE_DB = (3.0, 12.0)  # direct-to-reverberant energy ratio: light, small rooms
SYNTH_TIMEOUT_S = 60.0      # one utterance takes < 1 s; a hung engine must not hang the run

# espeak voices are "<accent>+<variant>" (espeak-ng --voices=en / --voices=variant).
# Only the built-in (non-MBROLA) accents are used: MBROLA voices need extra packages.
TRAIN_ACCENTS: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)
# "" = the accent's default voice.  Includes the Klatt synthesiser and whisper/croak
# so training sees very different excitation/formant styles.
TRAIN_VARIANTS: tuple[str, ...] = (
    "", "m1", "m3", "m4", "m6", "m7", "f1", "f2", "f3", "f5",
    "klatt", "klatt3", "klatt4", "whisper", "croak", "Andy", "linda",
)
# Held out: one accent far from the training ones (Caribbean) and one close to
# en-us (New York City); variants never used in training.
TEST_ACCENTS: tuple[str, ...] = ("en-029", "en-us-nyc")
TEST_VARIANTS: tuple[str, ...] = ("m2", "m8", "f4", "klatt2", "Annie")

_APT = "apt-get update && apt-get install -y"


# --------------------------------------------------------------------------- engines


def _find_executable(executable: str, packages: str) -> str:
    """Path of ``executable``; ``ValueError`` naming it and the apt command if it is missing."""
    path = shutil.which(executable)
    if path is None:
        raise ValueError(
            f"{executable} is not on PATH; it is needed to synthesise the speech corpus. "
            f"Install it with `{_APT} {packages}` (or `make speech-engines`)."
        )
    return path


def _run_engine(engine: str, cmd: list[str], voice: str, text: str, stdin: bytes | None = None) -> bytes:
    """stdout of ``cmd``; ``RuntimeError`` naming engine, voice and text if it fails or hangs."""
    what = f"{engine} (voice={voice!r} text={text!r})"
    try:
        res = subprocess.run(cmd, input=stdin, capture_output=True, timeout=SYNTH_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not finish within {SYNTH_TIMEOUT_S:g} s") from None
    err = res.stderr.decode(errors="replace").strip()
    # festival reports Scheme errors on stderr but still exits 0.
    if res.returncode != 0 or "SIOD ERROR" in err:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {err}")
    return res.stdout


def _check_voice(engine: str, voice: str, voices) -> None:
    # flite silently falls back to kal for an unknown voice, festival exits 0: check first.
    if voice not in voices:
        raise ValueError(f"unknown {engine} voice {voice!r}; expected one of {sorted(voices)}")


def _read_wav(path: Path, engine: str, voice: str, text: str) -> tuple[np.ndarray, int]:
    """Float32 mono samples and rate of an engine's output file."""
    if not path.is_file() or path.stat().st_size <= 44:
        raise RuntimeError(f"{engine} (voice={voice!r} text={text!r}) wrote no audio")
    x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return x.mean(axis=1), rate


def _version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S, check=False)
    return (out.stdout + out.stderr).strip()


def _parse_wav_bytes(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """Decode espeak-ng's ``--stdout`` WAV: it streams, so the RIFF/data sizes are
    placeholders (0x7fff....) and strict readers may reject or over-read them.
    We walk the chunks ourselves and take everything after "data" as int16."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError(f"espeak-ng returned no WAV data for {what}")
    pos, rate, channels, bits = 12, None, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if cid == b"fmt ":
            fmt = int.from_bytes(data[body:body + 2], "little")
            channels = int.from_bytes(data[body + 2:body + 4], "little")
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
            if fmt != 1 or bits != 16:
                raise RuntimeError(f"unexpected espeak-ng WAV format (fmt={fmt}, bits={bits}) for {what}")
        elif cid == b"data":
            if rate is None:
                break
            pcm = data[body:]
            pcm = pcm[: len(pcm) - len(pcm) % (2 * channels)]
            x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            if channels > 1:
                x = x.reshape(-1, channels).mean(axis=1)
            return x, rate
        pos = body + size + (size & 1)
    raise RuntimeError(f"malformed WAV from espeak-ng for {what}")


class EspeakNG:
    """espeak-ng: one subprocess per utterance, voices ``accent+variant`` (any espeak-ng voice).

    Raises:
        ValueError: ``espeak-ng`` is not on ``PATH`` (with how to install it).
    """

    name = "espeak"
    DEFAULT_WPM = 175  # espeak-ng's default -s
    # -p is 0-99 around 50; 150 per unit of factor maps PITCH_RANGE to ~27-72.
    PITCH_CENTER, PITCH_SPAN = 50, 150

    def __init__(self) -> None:
        self.executable = _find_executable("espeak-ng", "espeak-ng")

    def version(self) -> str:
        """``espeak-ng --version`` output."""
        return _version([self.executable, "--version"])

    def synthesize(self, text: str, voice: str, tempo: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        """Float32 samples in [-1, 1] and their rate for ``text`` spoken by ``voice``.

        Args:
            tempo: speaking-rate factor (``-s`` = 175 wpm x tempo).
            pitch: pitch factor (``-p`` = 50 + 150 x (pitch - 1), clipped to 0-99).

        Raises:
            RuntimeError: espeak-ng fails (e.g. unknown voice), hangs or returns no WAV.
        """
        wpm = round(self.DEFAULT_WPM * tempo)
        p = min(99, max(0, round(self.PITCH_CENTER + self.PITCH_SPAN * (pitch - 1.0))))
        # --stdout avoids a temp file per utterance; "--" guards against text starting with "-".
        cmd = [self.executable, "-v", voice, "-s", str(wpm), "-p", str(p), "--stdout", "--", text]
        out = _run_engine("espeak-ng", cmd, voice, text)
        return _parse_wav_bytes(out, f"voice={voice!r} text={text!r}")


class Flite:
    """flite: one subprocess per utterance writing a temp WAV.

    Raises:
        ValueError: ``flite`` is not on ``PATH`` (with how to install it).
    """

    name = "flite"
    # Mean F0 (Hz) of each voice as synthesised (measured), the base of int_f0_target_mean;
    # rms ignores the setting.  awb_time is left out (limited domain, see module docstring).
    VOICES = {"kal": 100.0, "kal16": 100.0, "awb": 140.0, "rms": 110.0, "slt": 170.0}

    def __init__(self) -> None:
        self.executable = _find_executable("flite", "flite")

    def version(self) -> str:
        """``flite --version`` output."""
        return _version([self.executable, "--version"])

    def synthesize(self, text: str, voice: str, tempo: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        """Float32 samples and their rate (8 kHz for kal, else 16 kHz).

        Args:
            tempo: speaking-rate factor (``duration_stretch`` = 1 / tempo).
            pitch: factor on the voice's mean F0 (``int_f0_target_mean``).

        Raises:
            ValueError: ``voice`` is not one of :attr:`VOICES`.
            RuntimeError: flite fails, hangs or writes no audio.
        """
        _check_voice("flite", voice, self.VOICES)
        with tempfile.TemporaryDirectory(prefix="flite") as tmp:
            out = Path(tmp) / "out.wav"
            _run_engine("flite", [
                self.executable, "-voice", voice,
                "--setf", f"duration_stretch={1.0 / tempo:.4f}",
                "--setf", f"int_f0_target_mean={self.VOICES[voice] * pitch:.1f}",
                "-t", text, "-o", str(out),
            ], voice, text)
            return _read_wav(out, "flite", voice, text)


class Festival:
    """festival's ``text2wave``: one process per utterance (~0.3 s start-up) writing a temp WAV.

    Raises:
        ValueError: ``text2wave`` / ``festival`` is not on ``PATH`` (with how to install them).
    """

    name = "festival"
    VOICES = ("kal_diphone", "cmu_us_slt_arctic_hts")
    _PACKAGES = "festival festvox-kallpc16k festvox-us-slt-hts"

    def __init__(self) -> None:
        self.festival = _find_executable("festival", self._PACKAGES)
        self.executable = _find_executable("text2wave", self._PACKAGES)

    def version(self) -> str:
        """``festival --version`` output."""
        return _version([self.festival, "--version"])

    def synthesize(self, text: str, voice: str, tempo: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        """Float32 samples and their rate (16 kHz kal_diphone, 32 kHz SLT HTS).

        Args:
            tempo: speaking-rate factor (kal_diphone: ``Duration_Stretch`` = 1 / tempo;
                HTS voices ignore that and take hts_engine's ``-r`` = tempo).
            pitch: HTS voices: shifted by ``12 log2(pitch)`` semitones (``-fm``);
                kal_diphone ignores it.

        Raises:
            ValueError: ``voice`` is not one of :attr:`VOICES`.
            RuntimeError: festival fails, hangs or writes no audio.
        """
        _check_voice("festival", voice, self.VOICES)
        if voice.endswith("_hts"):
            semitones = 12.0 * math.log2(pitch)
            setting = (f'(set! hts_engine_params (append hts_engine_params '
                       f'(list (list "-r" {tempo:.4f}) (list "-fm" {semitones:.4f}))))')
        else:
            setting = f"(Parameter.set 'Duration_Stretch {1.0 / tempo:.4f})"
        with tempfile.TemporaryDirectory(prefix="festival") as tmp:
            out = Path(tmp) / "out.wav"
            cmd = [self.executable, "-eval", f"(voice_{voice})", "-eval", setting, "-o", str(out)]
            _run_engine("festival", cmd, voice, text, stdin=text.encode())
            return _read_wav(out, "festival", voice, text)


# Engine name -> class; the name is the first half of a speaker "engine:voice".
ENGINES: dict[str, type] = {"espeak": EspeakNG, "flite": Flite, "festival": Festival}


def make_engine(name: str):
    """A new engine of :data:`ENGINES` by name.

    Raises:
        ValueError: ``name`` is not registered, or its executable is missing.
    """
    if name not in ENGINES:
        raise ValueError(f"unknown synthesis engine {name!r}; expected one of {sorted(ENGINES)}")
    return ENGINES[name]()


# --------------------------------------------------------------------------- speakers


def _espeak_voices(accents, variants) -> tuple[str, ...]:
    return tuple(f"{a}+{v}" if v else a for a in accents for v in variants)


_VOICES = {
    "train": {
        "espeak": _espeak_voices(TRAIN_ACCENTS, TRAIN_VARIANTS),
        "flite": ("kal", "kal16", "awb", "slt"),
        "festival": ("cmu_us_slt_arctic_hts",),
    },
    "test": {
        "espeak": _espeak_voices(TEST_ACCENTS, TEST_VARIANTS),
        "flite": ("rms",),
        "festival": ("kal_diphone",),
    },
}
# Probability of each engine per split (see the module docstring for the choice).
ENGINE_WEIGHTS: dict[str, dict[str, float]] = {
    "train": {"espeak": 0.4, "flite": 0.4, "festival": 0.2},
    "test": {"espeak": 1 / 3, "flite": 1 / 3, "festival": 1 / 3},
}


def split_voices(split: str) -> dict[str, tuple[str, ...]]:
    """``{engine: voices}`` a split draws from; dev uses train's."""
    check_split(split)
    return _VOICES["test" if split == "test" else "train"]


def speakers_for_split(split: str) -> list[str]:
    """Speakers ``engine:voice`` a split draws from (train and dev share theirs; test's
    are disjoint from them, and so are the espeak accents and variants on their own)."""
    return [f"{engine}:{voice}" for engine, voices in split_voices(split).items() for voice in voices]


# ------------------------------------------------------------------------ synthesis


def _utterance_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Every utterance gets its own stream keyed on (seed, split, index), so the
    # result does not depend on worker count, scheduling or split sizes.
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def _plan_utterance(seed: int, split: str, index: int) -> tuple[dict, np.random.Generator]:
    """Draw text, speaker and signal parameters for one utterance (no audio yet)."""
    rng = _utterance_rng(seed, split, index)
    weights = ENGINE_WEIGHTS["test" if split == "test" else "train"]
    engine = list(weights)[int(rng.choice(len(weights), p=list(weights.values())))]
    voices = split_voices(split)[engine]
    voice = voices[int(rng.integers(len(voices)))]
    plan = {
        "id": f"{split}_{index:05d}",
        "text": sentence(rng),
        "engine": engine,
        "voice": voice,
        "speaker": f"{engine}:{voice}",
        # Rounded before use, so the manifest holds exactly what the engine got.
        "tempo": round(float(rng.uniform(*TEMPO_RANGE)), 3),
        "pitch": round(float(rng.uniform(*PITCH_RANGE)), 3),
        "peak": float(rng.uniform(*PEAK_RANGE)),
        "snr_db": round(float(rng.uniform(*SNR_RANGE_DB)), 2),
        "rt60": None,
        "drr_db": None,
    }
    if rng.random() < REVERB_PROBABILITY:
        plan["rt60"] = round(float(rng.uniform(*RT60_RANGE_S)), 3)
        plan["drr_db"] = round(float(rng.uniform(*DRR_RANGE_DB)), 2)
    # The same rng continues into the impulse-response and noise draws.
    return plan, rng


def reverberate(x: torch.Tensor, rt60: float, drr_db: float, rng: np.random.Generator) -> torch.Tensor:
    """``x`` ([N], 16 kHz) convolved with a synthetic room impulse response, still [N] long.

    The response is a unit direct path followed, after 2 ms, by white noise decaying 60 dB
    over ``rt60`` seconds, scaled so the direct-to-reverberant energy ratio is ``drr_db``.
    The tail past the end of ``x`` is cut so transcripts and durations stay aligned.
    """
    n = max(int(rt60 * SAMPLE_RATE), 2)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-3.0 * math.log(10.0) * t / rt60)  # 10^-3 amplitude at rt60
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # reflections arrive after the direct sound
    tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / max(float(np.sum(tail**2)), 1e-12))
    tail[0] = 1.0
    rir = torch.from_numpy(tail).to(x.dtype)
    return AF.fftconvolve(x, rir)[: x.shape[-1]]


def _write_wav(path: Path, pcm: np.ndarray) -> None:
    # Several threads write different files, so no stale-temp sweep (it would also scan
    # the whole directory per file); synthesize_corpus sweeps once before starting.
    atomic_write({path: lambda f: sf.write(f, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")},
                 remove_stale=False)


def _synthesize_one(engines: dict, out_dir: Path, seed: int, split: str, index: int) -> dict:
    plan, rng = _plan_utterance(seed, split, index)
    audio, rate = engines[plan["engine"]].synthesize(plan["text"], plan["voice"], plan["tempo"], plan["pitch"])
    wav = resample(torch.from_numpy(audio), rate, SAMPLE_RATE).double()
    if plan["rt60"] is not None:
        wav = reverberate(wav, plan["rt60"], plan["drr_db"], rng)
    x = wav.numpy().copy()
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak <= 0.0:
        raise RuntimeError(f"{plan['engine']} produced silence for voice={plan['voice']!r} text={plan['text']!r}")
    x *= plan["peak"] / peak
    # White noise at the drawn SNR, relative to the mean power of the whole clip
    # (including the engines' short leading/trailing silences).
    noise_power = float(np.mean(x**2)) / (10.0 ** (plan["snr_db"] / 10.0))
    x += rng.standard_normal(x.shape[0]) * math.sqrt(noise_power)
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)

    rel = Path("wav") / split / f"{plan['id']}.wav"
    _write_wav(out_dir / rel, pcm)
    record = {"id": plan["id"], "path": rel.as_posix(), "text": plan["text"],
              "duration": round(pcm.shape[0] / SAMPLE_RATE, 4)}
    record.update({k: plan[k] for k in ("speaker", "engine", "voice", "tempo", "pitch", "rt60", "drr_db", "snr_db")})
    return record


def _corpus_config(counts: dict[str, int], seed: int, engine_versions: dict[str, str]) -> dict:
    # Everything that changes the produced audio/texts, and nothing that doesn't
    # (workers, progress), so changing the latter keeps the cache valid.
    return {
        "version": CORPUS_VERSION,
        "seed": seed,
        "num_utterances": counts,
        "sample_rate": SAMPLE_RATE,
        "word_classes": {k: list(v) for k, v in WORD_CLASSES.items()},
        "templates": list(TEMPLATES),
        "words_per_utterance": [MIN_WORDS, MAX_WORDS],
        "tempo_range": list(TEMPO_RANGE),
        "pitch_range": list(PITCH_RANGE),
        "snr_range_db": list(SNR_RANGE_DB),
        "peak_range": list(PEAK_RANGE),
        "reverb": {"probability": REVERB_PROBABILITY, "rt60_range_s": list(RT60_RANGE_S),
                   "drr_range_db": list(DRR_RANGE_DB)},
        "engine_weights": ENGINE_WEIGHTS,
        "speakers": {s: speakers_for_split(s) for s in SPLITS},
        "engines": engine_versions,
    }


def _manifest_paths(out_dir: Path) -> dict[str, Path]:
    return {s: manifest_path(out_dir, s) for s in SPLITS}


def _cache_is_valid(out_dir: Path, config: dict) -> bool:
    cfg_path = out_dir / "config.json"
    if not (cfg_path.is_file() and stats_path(out_dir).is_file() and vocabulary_path(out_dir).is_file()):
        return False
    try:
        if json.loads(cfg_path.read_text()) != config:
            return False
    except (OSError, ValueError):
        return False
    for split in SPLITS:
        try:
            records = read_manifest(out_dir, split)
        except (OSError, ValueError):
            return False
        if len(records) != config["num_utterances"][split]:
            return False
        if not all(Path(r["path"]).is_file() for r in records):
            return False
    return True


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` as an ``int`` if it is a whole number ``>= minimum``.

    Args:
        name: how the caller calls the value (``"num_train"``, ``"--num-train"``), for the error.

    Raises:
        ValueError: naming ``name``, the value and what is expected.
    """
    try:
        valid = int(value) == value and value >= minimum
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def synthesize_corpus(
    out_dir: str | os.PathLike,
    num_train: int = 3000,
    num_dev: int = 300,
    num_test: int = 1000,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Path]:
    """Synthesise the corpus into ``out_dir`` (or reuse it) and return the manifests.

    Args:
        out_dir: output directory (created if needed).
        num_train, num_dev, num_test: utterances per split.
        seed: corpus seed (>= 0). Utterance ``i`` of split ``s`` depends only on
            ``(seed, s, i)``: text, speaker, tempo, pitch, reverberation, level and noise
            are drawn from a numpy generator seeded with that triple, so the output is
            bit-identical for any ``workers`` and a larger corpus extends a smaller one.
        workers: parallel engine subprocesses (threads; the work is in the child
            processes and in GIL-free torch/numpy code).
        progress: show a tqdm progress bar.

    Returns:
        ``{"train": Path, "dev": Path, "test": Path}`` of the JSONL manifests.  The
        statistics (:func:`recipes.synthetic_speech.corpus.corpus_statistics`) are in ``stats.json``.

    If ``out_dir/config.json`` matches these parameters (engine versions and speaker
    lists included) and every manifest and wav exists, nothing is (re)written.
    Otherwise everything is regenerated and the fbank caches are removed.
    ``config.json`` is written last, so an interrupted run is never mistaken for a
    complete one.

    Raises:
        ValueError: a count, the seed or ``workers`` is out of range, ``out_dir`` is not
            writable, or an engine is not installed.
        RuntimeError: an engine fails or hangs.
    """
    counts = {
        split: check_int_at_least(f"num_{split}", n, 0)
        for split, n in (("train", num_train), ("dev", num_dev), ("test", num_test))
    }
    seed = check_int_at_least("seed", seed, 0)
    check_int_at_least("workers", workers, 1)

    engines = {name: make_engine(name) for name in ENGINES}
    out_dir = Path(out_dir)
    config = _corpus_config(counts, seed, {name: e.version() for name, e in engines.items()})
    manifests = _manifest_paths(out_dir)
    if _cache_is_valid(out_dir, config):
        return manifests

    prepare_output_dir(out_dir, "out_dir")
    cfg_path = out_dir / "config.json"
    cfg_path.unlink(missing_ok=True)  # invalidate first: we are about to rewrite
    for split in SPLITS:
        feature_cache_path(out_dir, split).unlink(missing_ok=True)
        wav_dir = out_dir / "wav" / split
        wav_dir.mkdir(parents=True, exist_ok=True)
        for stale in wav_dir.glob(".*.tmp"):  # temp files of a killed run
            stale.unlink(missing_ok=True)

    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    results: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(jobs), desc="synthesis", unit="utt", disable=not progress
    ) as bar:
        # map() yields in submission order, so manifests are ordered by id whatever
        # the completion order.
        for (split, _), rec in zip(
            jobs, pool.map(lambda job: _synthesize_one(engines, out_dir, seed, *job), jobs)
        ):
            results[split].append(rec)
            bar.update(1)

    files = {path: (lambda f, recs=results[split]: f.write("".join(json.dumps(r) + "\n" for r in recs).encode()))
             for split, path in manifests.items()}
    files[vocabulary_path(out_dir)] = lambda f: f.write("".join(w + "\n" for w in VOCABULARY).encode())
    atomic_write(files)
    atomic_write({stats_path(out_dir): json_writer(corpus_statistics(out_dir))})
    atomic_write({cfg_path: json_writer(config)})
    return manifests
