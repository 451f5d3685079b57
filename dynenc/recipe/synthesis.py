"""Synthesis of the speech corpus: vocabulary, voices, the espeak-ng engine, manifests.

The corpus is synthesised locally with ``espeak-ng`` so the recipe needs no
downloads: utterances are random sequences of 2-6 words from a small vocabulary
(:data:`VOCABULARY`), spoken by many accent x voice-variant combinations at random
speed / pitch, with light white noise added.  The test split is spoken only by
*held-out* speakers: accents in :data:`TEST_ACCENTS` combined with variants in
:data:`TEST_VARIANTS`, neither of which ever occurs in train/dev, so test WER
measures generalisation to unseen voices rather than memorised timbre.

A synthesis engine turns ``(text, voice, speed, pitch)`` into samples (:class:`EspeakNG`);
further engines belong next to it.  The files written are described in
:mod:`dynenc.recipe.corpus`.

Typical use::

    paths = synthesize_corpus("data/speech")            # {"train": Path(...jsonl), ...}
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from .corpus import (
    SAMPLE_RATE,
    SPLITS,
    check_split,
    feature_cache_path,
    manifest_path,
    prepare_output_dir,
    read_manifest,
)
from .features import resample, torch_threads

__all__ = [
    "CORPUS_VERSION",
    "VOCABULARY",
    "TRAIN_ACCENTS",
    "TRAIN_VARIANTS",
    "TEST_ACCENTS",
    "TEST_VARIANTS",
    "EspeakNG",
    "voices_for_split",
    "check_int_at_least",
    "synthesize_corpus",
]

# Bump whenever the synthesis procedure changes, so stale caches are rebuilt.
CORPUS_VERSION = 1

# Fixed per-split codes (not hash(split): Python salts str hashes per process).
_SPLIT_CODE = {"train": 0, "dev": 1, "test": 2}

# 60 short words; digits first so "read a number" style utterances are common.
VOCABULARY: tuple[str, ...] = (
    # digits
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    # numbers
    "ten", "eleven", "twelve", "twenty", "thirty", "forty", "fifty", "hundred",
    # colours
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple",
    # directions
    "up", "down", "left", "right", "north", "south", "east", "west", "forward", "back",
    # commands
    "go", "stop", "yes", "no", "on", "off", "open", "close", "start", "turn",
    "move", "play", "wait", "follow",
    # glue words (incl. apostrophes, so the tokenizer's ' symbol is exercised)
    "the", "a", "to", "and", "please", "now", "then", "don't", "it's", "let's",
)
MIN_WORDS, MAX_WORDS = 2, 6
SPEED_RANGE = (120, 230)  # espeak-ng -s, words per minute (inclusive)
PITCH_RANGE = (30, 70)    # espeak-ng -p, 0-99 (inclusive)
SNR_RANGE_DB = (25.0, 35.0)
PEAK_RANGE = (0.3, 0.9)   # random output level; also keeps noisy audio below clipping

# Speakers are "<accent>+<variant>" (espeak-ng --voices=en / --voices=variant).
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


# --------------------------------------------------------------------------- voices


def _voice_name(accent: str, variant: str) -> str:
    return f"{accent}+{variant}" if variant else accent


def voices_for_split(split: str) -> list[str]:
    """espeak-ng voice names (``accent+variant``) a split draws from.

    train and dev share :data:`TRAIN_ACCENTS` x :data:`TRAIN_VARIANTS`; test uses
    :data:`TEST_ACCENTS` x :data:`TEST_VARIANTS`, disjoint in both factors.
    """
    check_split(split)
    if split == "test":
        accents, variants = TEST_ACCENTS, TEST_VARIANTS
    else:
        accents, variants = TRAIN_ACCENTS, TRAIN_VARIANTS
    return [_voice_name(a, v) for a in accents for v in variants]


# ------------------------------------------------------------------------ espeak-ng


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
    """The espeak-ng engine: one subprocess per utterance, voices ``accent+variant``.

    An engine offers :meth:`version` (recorded in ``config.json``, so a new engine
    version rebuilds the corpus) and :meth:`synthesize`.

    Raises:
        ValueError: ``espeak-ng`` is not on ``PATH`` (with how to install it).
    """

    def __init__(self) -> None:
        executable = shutil.which("espeak-ng")
        if executable is None:
            raise ValueError(
                "espeak-ng is not on PATH; it is needed to synthesise the speech corpus. "
                "Install it with `apt-get update && apt-get install -y espeak-ng` "
                "(on macOS: `brew install espeak-ng`)."
            )
        self.executable = executable

    def version(self) -> str:
        """``espeak-ng --version`` output."""
        out = subprocess.run([self.executable, "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    def synthesize(self, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
        """Float samples in [-1, 1] and their rate for ``text`` spoken by ``voice``.

        Args:
            speed: words per minute (``-s``).
            pitch: 0-99 (``-p``).

        Raises:
            RuntimeError: espeak-ng fails or returns no WAV (voice and text named).
        """
        # --stdout avoids a temp file per utterance; "--" guards against text that
        # starts with "-" being read as an option.
        cmd = [self.executable, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--", text]
        res = subprocess.run(cmd, capture_output=True, check=False)
        what = f"voice={voice!r} text={text!r}"
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"espeak-ng failed (exit {res.returncode}) for {what}: {err}")
        return _parse_wav_bytes(res.stdout, what)


# ------------------------------------------------------------------------ synthesis


def _utterance_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Every utterance gets its own stream keyed on (seed, split, index), so the
    # result does not depend on worker count, scheduling or split sizes.
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def _plan_utterance(seed: int, split: str, index: int) -> tuple[dict, np.random.Generator]:
    """Draw text/voice/speed/pitch/level/SNR for one utterance (no audio yet)."""
    rng = _utterance_rng(seed, split, index)
    n_words = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
    words = [VOCABULARY[i] for i in rng.integers(0, len(VOCABULARY), size=n_words)]
    voices = voices_for_split(split)
    plan = {
        "id": f"{split}_{index:05d}",
        "text": " ".join(words),
        "voice": voices[int(rng.integers(0, len(voices)))],
        "speed": int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
        "pitch": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
        "peak": float(rng.uniform(*PEAK_RANGE)),
        "snr_db": round(float(rng.uniform(*SNR_RANGE_DB)), 2),
    }
    # The same rng continues into the noise draw, keeping everything keyed on the id.
    return plan, rng


def _synthesize_one(engine: EspeakNG, out_dir: Path, seed: int, split: str, index: int) -> dict:
    plan, rng = _plan_utterance(seed, split, index)
    audio, rate = engine.synthesize(plan["text"], plan["voice"], plan["speed"], plan["pitch"])
    wav = resample(torch.from_numpy(audio), rate, SAMPLE_RATE)
    x = wav.numpy().astype(np.float64)
    peak = float(np.abs(x).max())
    if peak <= 0.0:
        raise RuntimeError(f"espeak-ng produced silence for voice={plan['voice']!r} text={plan['text']!r}")
    x *= plan["peak"] / peak
    # White noise at the drawn SNR, relative to the mean power of the whole clip
    # (including espeak's short leading/trailing silences).
    noise_power = float(np.mean(x**2)) / (10.0 ** (plan["snr_db"] / 10.0))
    x += rng.standard_normal(x.shape[0]) * math.sqrt(noise_power)
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)

    rel = Path("wav") / split / f"{plan['id']}.wav"
    path = out_dir / rel
    tmp = path.with_suffix(".wav.tmp")
    # Write then rename: an interrupted run never leaves a truncated .wav behind.
    sf.write(str(tmp), pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return {
        "id": plan["id"],
        "path": rel.as_posix(),
        "text": plan["text"],
        "duration": round(pcm.shape[0] / SAMPLE_RATE, 4),
        "voice": plan["voice"],
        "speed": plan["speed"],
        "pitch": plan["pitch"],
        "snr_db": plan["snr_db"],
    }


def _corpus_config(num_train: int, num_dev: int, num_test: int, seed: int, espeak_version: str) -> dict:
    # Everything that changes the produced audio/texts, and nothing that doesn't
    # (workers, progress), so changing the latter keeps the cache valid.
    return {
        "version": CORPUS_VERSION,
        "seed": seed,
        "num_utterances": {"train": num_train, "dev": num_dev, "test": num_test},
        "sample_rate": SAMPLE_RATE,
        "vocabulary": list(VOCABULARY),
        "words_per_utterance": [MIN_WORDS, MAX_WORDS],
        "speed_range": list(SPEED_RANGE),
        "pitch_range": list(PITCH_RANGE),
        "snr_range_db": list(SNR_RANGE_DB),
        "peak_range": list(PEAK_RANGE),
        "voices": {s: voices_for_split(s) for s in SPLITS},
        "espeak_ng": espeak_version,
    }


def _manifest_paths(out_dir: Path) -> dict[str, Path]:
    return {s: manifest_path(out_dir, s) for s in SPLITS}


def _cache_is_valid(out_dir: Path, config: dict) -> bool:
    cfg_path = out_dir / "config.json"
    if not cfg_path.is_file():
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
    num_train: int = 2400,
    num_dev: int = 200,
    num_test: int = 300,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Path]:
    """Synthesise the corpus into ``out_dir`` (or reuse it) and return the manifests.

    Args:
        out_dir: output directory (created if needed).
        num_train, num_dev, num_test: utterances per split.
        seed: corpus seed (>= 0). Utterance ``i`` of split ``s`` depends only on
            ``(seed, s, i)``: text, voice, speed, pitch, level and noise are drawn from
            a numpy generator seeded with that triple, so the output is bit-identical
            for any ``workers`` and a larger corpus extends a smaller one.
        workers: parallel espeak-ng subprocesses (threads; the work is in the child
            processes and in GIL-free torch/numpy code).
        progress: show a tqdm progress bar.

    Returns:
        ``{"train": Path, "dev": Path, "test": Path}`` of the JSONL manifests.

    If ``out_dir/config.json`` matches these parameters and every manifest and wav
    exists, nothing is (re)written.  Otherwise everything is regenerated and the
    fbank caches are removed.  ``config.json`` is written last, so an interrupted
    run is never mistaken for a complete one.

    Raises:
        ValueError: a count, the seed or ``workers`` is out of range, ``out_dir`` is not
            writable, or espeak-ng is not installed.
        RuntimeError: espeak-ng fails.
    """
    counts = {
        split: check_int_at_least(f"num_{split}", n, 0)
        for split, n in (("train", num_train), ("dev", num_dev), ("test", num_test))
    }
    seed = check_int_at_least("seed", seed, 0)
    check_int_at_least("workers", workers, 1)

    engine = EspeakNG()
    out_dir = Path(out_dir)
    config = _corpus_config(counts["train"], counts["dev"], counts["test"], seed, engine.version())
    manifests = _manifest_paths(out_dir)
    if _cache_is_valid(out_dir, config):
        return manifests

    prepare_output_dir(out_dir, "out_dir")
    cfg_path = out_dir / "config.json"
    cfg_path.unlink(missing_ok=True)  # invalidate first: we are about to rewrite
    for split in SPLITS:
        feature_cache_path(out_dir, split).unlink(missing_ok=True)
        (out_dir / "wav" / split).mkdir(parents=True, exist_ok=True)

    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    results: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(jobs), desc="espeak-ng", unit="utt", disable=not progress
    ) as bar:
        # map() yields in submission order, so manifests are ordered by id whatever
        # the completion order.
        for (split, _), rec in zip(
            jobs, pool.map(lambda job: _synthesize_one(engine, out_dir, seed, *job), jobs)
        ):
            results[split].append(rec)
            bar.update(1)

    for split, path in manifests.items():
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for rec in results[split]:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    tmp = cfg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(tmp, cfg_path)
    return manifests


