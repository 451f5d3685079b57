"""Data for the speech recipe: a synthetic English command corpus, fbank features,
a character tokenizer and CTC-ready batches.

The corpus is synthesised locally with ``espeak-ng`` so the recipe needs no
downloads: utterances are random sequences of 2-6 words from a small vocabulary
(:data:`VOCABULARY`), spoken by many accent x voice-variant combinations at random
speed / pitch, with light white noise added.  The test split is spoken only by
*held-out* speakers: accents in :data:`TEST_ACCENTS` combined with variants in
:data:`TEST_VARIANTS`, neither of which ever occurs in train/dev, so test WER
measures generalisation to unseen voices rather than memorised timbre.

Layout of ``out_dir`` after :func:`synthesize_corpus`::

    config.json               parameters the corpus was made with (cache key)
    train.jsonl dev.jsonl test.jsonl
                              one JSON object per line: {"id", "path", "text",
                              "duration", "voice", "speed", "pitch", "snr_db"};
                              "path" is relative to out_dir (the corpus can move)
    wav/<split>/<id>.wav      16 kHz mono 16-bit PCM
    feats_<split>.pt          fbank cache written by :func:`load_split`

Typical use::

    paths = synthesize_corpus("data/speech")
    train = load_split("data/speech", "train")          # [(feats [T, 80], text), ...]
    tok = CharTokenizer()
    for feats, feat_lens, targets, target_lens in SpeechBatches(train, tok, max_frames=20000):
        log_probs = model(feats, feat_lens)             # [T, B, V] for ctc_loss
        loss = F.ctc_loss(log_probs, targets, out_lens, target_lens, blank=tok.blank)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
from tqdm import tqdm

__all__ = [
    "VOCABULARY",
    "TRAIN_ACCENTS",
    "TRAIN_VARIANTS",
    "TEST_ACCENTS",
    "TEST_VARIANTS",
    "SAMPLE_RATE",
    "NUM_MEL_BINS",
    "SPLITS",
    "voices_for_split",
    "synthesize_corpus",
    "read_manifest",
    "compute_fbank",
    "load_split",
    "CharTokenizer",
    "collate_batch",
    "SpeechBatches",
]

# Bump whenever the synthesis procedure changes, so stale caches are rebuilt.
CORPUS_VERSION = 1
FEATURE_VERSION = 1

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
SPLITS = ("train", "dev", "test")
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

_ESPEAK_RATE = 22050  # espeak-ng's native output rate


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads.  Per-utterance tensors are tiny, so
    intra-op parallelism only adds sync overhead (and thrashes when our worker threads
    or other processes already occupy the cores); restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- voices


def _voice_name(accent: str, variant: str) -> str:
    return f"{accent}+{variant}" if variant else accent


def voices_for_split(split: str) -> list[str]:
    """espeak-ng voice names (``accent+variant``) a split draws from.

    train and dev share :data:`TRAIN_ACCENTS` x :data:`TRAIN_VARIANTS`; test uses
    :data:`TEST_ACCENTS` x :data:`TEST_VARIANTS`, disjoint in both factors.
    """
    _check_split(split)
    if split == "test":
        accents, variants = TEST_ACCENTS, TEST_VARIANTS
    else:
        accents, variants = TRAIN_ACCENTS, TRAIN_VARIANTS
    return [_voice_name(a, v) for a in accents for v in variants]


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# ------------------------------------------------------------------------ espeak-ng


def _espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng is not on PATH; it is needed to synthesise the speech corpus. "
            "Install it with `apt-get update && apt-get install -y espeak-ng` "
            "(on macOS: `brew install espeak-ng`)."
        )
    return exe


def _espeak_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


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


def _espeak(exe: str, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    # --stdout avoids a temp file per utterance; "--" guards against text that
    # starts with "-" being read as an option.
    cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--", text]
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


def _resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """``[N]`` -> ``[ceil(N * new / orig)]`` with torchaudio's sinc resampler.

    The input is zero-padded to a multiple of 0.2 s first and the output trimmed:
    resample runs a conv1d, and oneDNN caches one primitive (~1 MB) per input shape,
    so arbitrary lengths grew RSS by ~1 GB over a corpus.  The sinc kernel already
    zero-pads past the end, so the trimmed output is unchanged by the padding.
    """
    if orig == new:
        return wav
    n = wav.shape[-1]
    step = max(1, orig // 5)
    padded = torch.nn.functional.pad(wav, (0, -(-n // step) * step - n))
    return AF.resample(padded, orig, new)[..., : -(-n * new // orig)]


def _synthesize_one(exe: str, out_dir: Path, seed: int, split: str, index: int) -> dict:
    plan, rng = _plan_utterance(seed, split, index)
    audio, rate = _espeak(exe, plan["text"], plan["voice"], plan["speed"], plan["pitch"])
    wav = _resample(torch.from_numpy(audio), rate, SAMPLE_RATE)
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
    return {s: out_dir / f"{s}.jsonl" for s in SPLITS}


def _cache_is_valid(out_dir: Path, config: dict) -> bool:
    cfg_path = out_dir / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        if json.loads(cfg_path.read_text()) != config:
            return False
    except (OSError, ValueError):
        return False
    for split, mpath in _manifest_paths(out_dir).items():
        if not mpath.is_file():
            return False
        try:
            records = read_manifest(out_dir, split)
        except (OSError, ValueError):
            return False
        if len(records) != config["num_utterances"][split]:
            return False
        if not all(Path(r["path"]).is_file() for r in records):
            return False
    return True


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
        RuntimeError: espeak-ng is not installed or fails.
    """
    counts = {"train": num_train, "dev": num_dev, "test": num_test}
    for split, n in counts.items():
        if int(n) != n or n < 0:
            raise ValueError(f"num_{split} must be a non-negative integer, got {n!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")

    exe = _espeak_binary()
    out_dir = Path(out_dir)
    config = _corpus_config(int(num_train), int(num_dev), int(num_test), int(seed), _espeak_version(exe))
    manifests = _manifest_paths(out_dir)
    if _cache_is_valid(out_dir, config):
        return manifests

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.json"
    cfg_path.unlink(missing_ok=True)  # invalidate first: we are about to rewrite
    for split in SPLITS:
        (out_dir / f"feats_{split}.pt").unlink(missing_ok=True)
        (out_dir / "wav" / split).mkdir(parents=True, exist_ok=True)

    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    results: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with _torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(jobs), desc="espeak-ng", unit="utt", disable=not progress
    ) as bar:
        # map() yields in submission order, so manifests are ordered by id whatever
        # the completion order.
        for (split, _), rec in zip(
            jobs, pool.map(lambda job: _synthesize_one(exe, out_dir, int(seed), *job), jobs)
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


def read_manifest(out_dir: str | os.PathLike, split: str) -> list[dict]:
    """Records of ``out_dir/<split>.jsonl`` with ``"path"`` made absolute."""
    _check_split(split)
    out_dir = Path(out_dir)
    mpath = out_dir / f"{split}.jsonl"
    if not mpath.is_file():
        raise FileNotFoundError(f"manifest {mpath} not found; run synthesize_corpus({str(out_dir)!r}) first")
    records = []
    with open(mpath) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rec["path"] = str((out_dir / rec["path"]).resolve())
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{mpath}:{lineno}: bad manifest line: {e}") from None
            records.append(rec)
    return records


# ------------------------------------------------------------------------- features


def compute_fbank(waveform: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """80-dim log-mel filterbank, 25 ms window / 10 ms shift, per-utterance mean removed.

    Args:
        waveform: float samples in [-1, 1], shape ``[N]`` or ``[C, N]`` (channels
            are averaged).
        sample_rate: rate of ``waveform`` in Hz.

    Returns:
        float32 tensor ``[T, 80]`` with ``T = 1 + (N - 400) // 160`` at 16 kHz.
    """
    wav = torch.as_tensor(waveform, dtype=torch.float32)
    if wav.dim() == 2:
        wav = wav.mean(dim=0)
    if wav.dim() != 1:
        raise ValueError(f"waveform must be [N] or [C, N], got shape {tuple(wav.shape)}")
    min_len = int(round(0.025 * sample_rate))
    if wav.numel() < min_len:
        raise ValueError(f"waveform too short for one 25 ms frame: {wav.numel()} samples at {sample_rate} Hz")
    feats = kaldi.fbank(
        # Kaldi expects int16-scaled samples; this keeps its energy floor meaningful.
        wav.unsqueeze(0) * 32768.0,
        num_mel_bins=NUM_MEL_BINS,
        frame_length=25.0,
        frame_shift=10.0,
        sample_frequency=float(sample_rate),
        dither=0.0,  # deterministic features
    )
    # Per-utterance mean normalisation (CMN): removes channel/level differences,
    # and makes zero padding equal to the utterance's mean frame.
    return (feats - feats.mean(dim=0, keepdim=True)).contiguous()


def _read_audio(path: str) -> tuple[np.ndarray, int]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/...
        raise RuntimeError(f"could not read audio file {path}: {e}") from e
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.size == 0:
        raise RuntimeError(f"audio file {path} is empty")
    return audio, rate


def load_split(out_dir: str | os.PathLike, split: str, progress: bool = False) -> list[tuple[torch.Tensor, str]]:
    """Features and transcripts of one split, computed once and cached.

    Returns:
        list of ``(features float32 [T_i, 80], text)`` in manifest order.

    The cache ``out_dir/feats_<split>.pt`` holds one concatenated ``[sum T_i, 80]``
    tensor plus lengths and texts (one file: fast to load, no per-utterance pickles),
    loaded with ``torch.load(weights_only=True)``.  It is keyed on a hash of the
    manifest, so a re-synthesised corpus invalidates it.

    Raises:
        FileNotFoundError: the manifest or an audio file is missing (path named).
        RuntimeError: an audio file cannot be decoded (path named).
    """
    _check_split(split)
    out_dir = Path(out_dir)
    mpath = out_dir / f"{split}.jsonl"
    records = read_manifest(out_dir, split)
    key = hashlib.sha256(mpath.read_bytes()).hexdigest() + f":fbank{NUM_MEL_BINS}:v{FEATURE_VERSION}"
    cache = out_dir / f"feats_{split}.pt"

    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("key") == key:
                feats = torch.split(blob["feats"], blob["lengths"].tolist())
                return list(zip(feats, blob["texts"]))
        except Exception:
            pass  # unreadable / old-format cache: recompute below

    feats_list, texts = [], []
    with _torch_threads(1):
        for rec in tqdm(records, desc=f"fbank {split}", unit="utt", disable=not progress):
            audio, rate = _read_audio(rec["path"])
            try:
                feats_list.append(compute_fbank(audio, rate))
            except ValueError as e:
                raise RuntimeError(f"cannot compute features for {rec['path']}: {e}") from e
            texts.append(rec["text"])
    lengths = torch.tensor([f.shape[0] for f in feats_list], dtype=torch.int64)
    flat = torch.cat(feats_list) if feats_list else torch.zeros(0, NUM_MEL_BINS)
    tmp = cache.with_suffix(".pt.tmp")
    torch.save({"key": key, "feats": flat, "lengths": lengths, "texts": texts}, tmp)
    os.replace(tmp, cache)
    return list(zip(torch.split(flat, lengths.tolist()), texts))


# ------------------------------------------------------------------------ tokenizer


class CharTokenizer:
    """Character vocabulary for CTC: ``0 = blank``, ``1 = " "``, ``2 = "'"``, ``3.. = a-z``.

    Args:
        lowercase: lower-case text before encoding (default True); any character
            still outside the alphabet raises ``ValueError`` naming it.
    """

    blank: int = 0
    symbols: tuple[str, ...] = ("<blank>", " ", "'") + tuple("abcdefghijklmnopqrstuvwxyz")

    def __init__(self, lowercase: bool = True) -> None:
        self.lowercase = lowercase
        self._index = {c: i for i, c in enumerate(self.symbols) if i != self.blank}

    @property
    def vocab_size(self) -> int:
        """Number of output classes including the blank (29)."""
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids in ``[1, vocab_size)`` (never the blank)."""
        if self.lowercase:
            text = text.lower()
        ids = []
        for pos, ch in enumerate(text):
            i = self._index.get(ch)
            if i is None:
                raise ValueError(f"CharTokenizer cannot encode character {ch!r} at position {pos} of {text!r}")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """ids -> text; blanks are dropped, repeats are kept (see :meth:`decode_ctc`)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.symbols):
                raise ValueError(f"token id {i} out of range [0, {len(self.symbols)})")
            if i != self.blank:
                out.append(self.symbols[i])
        return "".join(out)

    def decode_ctc(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Greedy CTC decoding of a frame-wise argmax path ``[T]``: collapse repeats, drop blanks."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        collapsed, prev = [], None
        for i in ids:
            i = int(i)
            if i != prev:
                collapsed.append(i)
            prev = i
        return self.decode(collapsed)


# -------------------------------------------------------------------------- batches


def collate_batch(
    items: Sequence[tuple[torch.Tensor, str | Sequence[int]]],
    tokenizer: CharTokenizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a list of ``(features [T_i, F], text or token ids)`` for CTC training.

    Returns:
        features: float32 ``[B, T_max, F]``, zero-padded after each utterance.
        feature_lengths: int64 ``[B]`` (= ``T_i``).
        targets: int64 ``[sum U_i]``, all transcripts' ids concatenated (the 1-D form
            ``torch.nn.functional.ctc_loss`` accepts).
        target_lengths: int64 ``[B]`` (= ``U_i``).
    """
    if not items:
        raise ValueError("collate_batch needs at least one item")
    tokenizer = tokenizer or CharTokenizer()
    feats = [torch.as_tensor(f, dtype=torch.float32) for f, _ in items]
    dims = {f.shape[1] for f in feats}
    if any(f.dim() != 2 for f in feats) or len(dims) != 1:
        raise ValueError(f"features must all be [T, F] with the same F, got {[tuple(f.shape) for f in feats]}")
    feature_lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    padded = torch.zeros(len(feats), int(feature_lengths.max()), dims.pop(), dtype=torch.float32)
    for b, f in enumerate(feats):
        padded[b, : f.shape[0]] = f
    ids = [tokenizer.encode(t) if isinstance(t, str) else [int(i) for i in t] for _, t in items]
    target_lengths = torch.tensor([len(i) for i in ids], dtype=torch.int64)
    targets = torch.tensor([i for seq in ids for i in seq], dtype=torch.int64)
    return padded, feature_lengths, targets, target_lengths


class SpeechBatches:
    """Iterable of CTC batches (see :func:`collate_batch`) over an in-memory split.

    Args:
        data: ``[(features [T, F], text), ...]`` e.g. from :func:`load_split`.
        tokenizer: defaults to :class:`CharTokenizer`.
        batch_size: utterances per batch (used when ``max_frames`` is None).
        max_frames: if set, batches are filled up to ``B * T_max <= max_frames``
            padded frames instead of a fixed size (more, shorter utterances per batch).
        shuffle: shuffle with ``torch.Generator`` seeded from ``(seed, epoch)``.
        sort_by_length: bucket utterances of similar length to reduce padding.  With
            ``shuffle``, the data is shuffled, cut into pools of ``pool_batches``
            batches' worth, sorted by length within each pool, and the batch order
            shuffled again, so batches differ between epochs but stay length-homogeneous.
            Without ``shuffle``, a global length sort (deterministic, e.g. for eval).
        drop_last: drop a final fixed-size batch smaller than ``batch_size``.

    Call :meth:`set_epoch` before each epoch to get a new (reproducible) order;
    iterating twice without it yields the same batches.
    """

    def __init__(
        self,
        data: Sequence[tuple[torch.Tensor, str]],
        tokenizer: CharTokenizer | None = None,
        batch_size: int = 32,
        max_frames: int | None = None,
        shuffle: bool = True,
        sort_by_length: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pool_batches: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.data = data
        self.tokenizer = tokenizer or CharTokenizer()
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.shuffle = shuffle
        self.sort_by_length = sort_by_length
        self.seed = seed
        self.drop_last = drop_last
        self.pool_batches = pool_batches
        self.epoch = 0
        self._lengths = [int(f.shape[0]) for f, _ in data]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunk(self, order: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        if self.max_frames is None:
            for s in range(0, len(order), self.batch_size):
                batches.append(order[s : s + self.batch_size])
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            return batches
        cur: list[int] = []
        cur_max = 0
        for i in order:
            new_max = max(cur_max, self._lengths[i])
            if cur and new_max * (len(cur) + 1) > self.max_frames:
                batches.append(cur)
                cur, new_max = [], self._lengths[i]
            cur.append(i)
            cur_max = new_max
        if cur:
            batches.append(cur)
        return batches

    def batch_indices(self) -> list[list[int]]:
        """Indices into ``data`` for each batch of the current epoch."""
        n = len(self.data)
        if not self.shuffle:
            order = list(range(n))
            if self.sort_by_length:
                order.sort(key=lambda i: self._lengths[i])
            return self._chunk(order)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen).tolist()
        if not self.sort_by_length:
            return self._chunk(order)
        # Pool size in utterances: with max_frames, estimate utterances per batch.
        if self.max_frames is None:
            per_batch = self.batch_size
        else:
            mean_len = max(1.0, sum(self._lengths) / max(1, n))
            per_batch = max(1, int(self.max_frames / mean_len))
        pool = max(1, per_batch * self.pool_batches)
        batches = []
        for s in range(0, n, pool):
            chunk = sorted(order[s : s + pool], key=lambda i: self._lengths[i])
            batches.extend(self._chunk(chunk))
        perm = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[p] for p in perm]

    def __len__(self) -> int:
        return len(self.batch_indices())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx in self.batch_indices():
            yield collate_batch([self.data[i] for i in idx], self.tokenizer)


# ------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``dynenc data``."""
    p.add_argument("--out-dir", default="data/speech", help="corpus directory (default: data/speech)")
    p.add_argument("--num-train", type=int, default=2400)
    p.add_argument("--num-dev", type=int, default=200)
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--no-features", action="store_true", help="skip computing and caching fbank features")
    p.add_argument("--quiet", action="store_true")


def run(a: argparse.Namespace) -> int:
    """``dynenc data [--out-dir DIR] [--num-train N ...]``: synthesise (cached) + features."""
    try:
        manifests = synthesize_corpus(
            a.out_dir, a.num_train, a.num_dev, a.num_test, a.seed, a.workers, progress=not a.quiet
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, path in manifests.items():
        if not a.no_features:
            load_split(a.out_dir, split, progress=not a.quiet)
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Synthesise the dynenc speech corpus with espeak-ng.")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
