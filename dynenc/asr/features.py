"""Audio reading, 80-dim fbank features and the per-split feature cache.

Typical use::

    train = load_split("data/speech", "train")          # [(feats [T, 80], text), ...]
    train = load_split("data/speech", "train", features="waveform")   # [(wave [S, 1], text), ...]
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
from tqdm import tqdm

from ..fileio import atomic_write
from .manifest import check_split, feature_cache_path, manifest_path, read_manifest
from .tokenizer import CharTokenizer, Tokenizer

__all__ = [
    "FEATURE_KINDS",
    "ROWS_PER_FRAME",
    "SAMPLE_RATE",
    "NUM_MEL_BINS",
    "FEATURE_VERSION",
    "FBANK_OPTIONS",
    "compute_fbank",
    "read_audio",
    "resample",
    "load_split",
]

SAMPLE_RATE = 16000
#: What :func:`load_split` returns per utterance: fbank frames (the conformer's input) or the
#: 16 kHz waveform (a foundation encoder's).
FEATURE_KINDS = ("fbank", "waveform")
#: Rows of a :func:`load_split` item per 10 ms feature frame: batch sizes counted in frames
#: (``max_frames``) mean the same audio for either kind.
ROWS_PER_FRAME = {"fbank": 1, "waveform": SAMPLE_RATE // 100}
#: A waveform needs one 25 ms window: a wav2vec2 feature extractor's first frame (400 samples).
MIN_WAVEFORM_SAMPLES = 400
# Bump whenever compute_fbank changes in a way FBANK_OPTIONS does not capture (e.g. the
# normalisation), so stale caches are rebuilt.
FEATURE_VERSION = 1
NUM_MEL_BINS = 80
# torchaudio.compliance.kaldi.fbank options; part of the feature cache key.
FBANK_OPTIONS = {
    "num_mel_bins": NUM_MEL_BINS,
    "frame_length": 25.0,
    "frame_shift": 10.0,
    "dither": 0.0,  # deterministic features
}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads.  Per-utterance tensors are tiny, so
    intra-op parallelism only adds sync overhead (and thrashes when worker threads
    or other processes already occupy the cores); restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
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
    frame_ms = FBANK_OPTIONS["frame_length"]
    if wav.numel() < int(round(frame_ms / 1000 * sample_rate)):
        raise ValueError(f"waveform too short for one {frame_ms:g} ms frame: {wav.numel()} samples at {sample_rate} Hz")
    feats = kaldi.fbank(
        # Kaldi expects int16-scaled samples; this keeps its energy floor meaningful.
        wav.unsqueeze(0) * 32768.0,
        sample_frequency=float(sample_rate),
        **FBANK_OPTIONS,
    )
    # Per-utterance mean normalisation (CMN): removes channel/level differences,
    # and makes zero padding equal to the utterance's mean frame.
    return (feats - feats.mean(dim=0, keepdim=True)).contiguous()


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sample rate of an audio file.

    Raises:
        ValueError: the file is missing, cannot be decoded or holds no samples (path named).
    """
    if not os.path.isfile(path):
        raise ValueError(f"audio file not found: {path}")
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=False)
    except Exception as e:  # libsndfile's error types differ across soundfile versions
        raise ValueError(f"could not read audio file {path}: {e}") from e
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.size == 0:
        raise ValueError(f"audio file {path} is empty")
    return audio, rate


def _feature_settings(kind: str) -> dict:
    """Everything besides the audio and the manifest that changes the cached features."""
    settings = {"version": FEATURE_VERSION, "sample_rate": SAMPLE_RATE}
    return {**settings, "fbank": FBANK_OPTIONS} if kind == "fbank" else {**settings, "kind": kind}


def _cache_key(mpath: Path, records: list[dict], kind: str) -> str:
    """sha256 over the feature settings, the manifest and every audio file's bytes.

    Hashing the bytes (not size + mtime) also catches a replaced file that kept its size
    and timestamp, e.g. one copied with ``cp -p``.
    """
    h = hashlib.sha256(json.dumps(_feature_settings(kind), sort_keys=True).encode())
    h.update(mpath.read_bytes())
    for rec in records:
        try:
            audio = Path(rec["path"]).read_bytes()
        except OSError as e:
            raise ValueError(
                f"{mpath}: utterance {rec['id']!r}: cannot read audio file {rec['path']}: {e.strerror or e}"
            ) from e
        # The length prefix keeps file boundaries part of the key.
        h.update(len(audio).to_bytes(8, "little"))
        h.update(audio)
    return h.hexdigest()


def _check_transcripts(mpath: Path, records: list[dict], tokenizer: Tokenizer) -> None:
    """Fail on load, naming the utterance, rather than in some later training batch."""
    for rec in records:
        try:
            tokenizer.encode(rec["text"])
        except ValueError as e:
            raise ValueError(f"{mpath}: utterance {rec['id']!r}: transcript cannot be encoded: {e}") from None


def _waveform(audio: np.ndarray, rate: int) -> torch.Tensor:
    """float32 ``[S, 1]`` at :data:`SAMPLE_RATE`."""
    wav = resample(torch.as_tensor(audio, dtype=torch.float32), rate, SAMPLE_RATE)
    if wav.numel() < MIN_WAVEFORM_SAMPLES:
        raise ValueError(f"waveform too short for one 25 ms frame: {wav.numel()} samples at {SAMPLE_RATE} Hz")
    return wav.unsqueeze(1)


def _utterance_features(mpath: Path, rec: dict, kind: str) -> torch.Tensor:
    try:
        audio, rate = read_audio(rec["path"])
        return compute_fbank(audio, rate) if kind == "fbank" else _waveform(audio, rate)
    except ValueError as e:
        where = "" if rec["path"] in str(e) else f" ({rec['path']})"  # read_audio's errors name it already
        raise ValueError(f"{mpath}: utterance {rec['id']!r}{where}: {e}") from e


def load_split(
    out_dir: str | os.PathLike,
    split: str,
    progress: bool = False,
    tokenizer: Tokenizer | None = None,
    features: str = "fbank",
) -> list[tuple[torch.Tensor, str]]:
    """Features (or waveforms) and transcripts of one split, computed once and cached.

    Args:
        out_dir: data directory (see :mod:`dynenc.asr.manifest`).
        split: one of ``train``, ``dev``, ``test``.
        progress: show a tqdm progress bar while computing features.
        tokenizer: every transcript must be encodable by it (default :class:`CharTokenizer`).
        features: ``"fbank"`` or ``"waveform"`` (:data:`FEATURE_KINDS`; a model's
            ``ModelConfig.input_features``).

    Returns:
        list of ``(features float32 [T_i, 80], text)`` in manifest order, or with
        ``features="waveform"`` ``(samples float32 [S_i, 1] at 16 kHz, text)``.

    The cache ``out_dir/feats_<split>.pt`` holds one concatenated ``[sum T_i, 80]``
    tensor plus lengths and texts (one file: fast to load, no per-utterance pickles),
    loaded with ``torch.load(weights_only=True)``.  It is keyed on the manifest, the
    bytes of every audio file and the feature settings (:data:`FEATURE_VERSION`,
    :data:`FBANK_OPTIONS`, the sample rate), so replacing a WAV or changing a setting
    recomputes the features.

    Raises:
        FileNotFoundError: the manifest is missing.
        ValueError: a manifest line is malformed, or an utterance's audio file is missing,
            cannot be decoded or is too short, or its transcript cannot be encoded (the
            manifest, the utterance and the problem are named).
    """
    check_split(split)
    if features not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")
    mpath = manifest_path(out_dir, split)
    records = read_manifest(out_dir, split)
    _check_transcripts(mpath, records, tokenizer or CharTokenizer())
    key = _cache_key(mpath, records, features)
    cache = feature_cache_path(out_dir, split, features)

    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("key") == key:
                feats = torch.split(blob["feats"], blob["lengths"].tolist())
                return list(zip(feats, blob["texts"]))
        except Exception:
            pass  # unreadable / old-format cache: recompute below

    with torch_threads(1):
        feats_list = [
            _utterance_features(mpath, rec, features)
            for rec in tqdm(records, desc=f"{features} {split}", unit="utt", disable=not progress)
        ]
    texts = [rec["text"] for rec in records]
    lengths = torch.tensor([f.shape[0] for f in feats_list], dtype=torch.int64)
    flat = torch.cat(feats_list) if feats_list else torch.zeros(0, NUM_MEL_BINS if features == "fbank" else 1)
    # Ranks of a torchrun job may fill the cache at once: each writes a temp file of its own
    # (the replaces are atomic and they write the same features), none removes another's.
    atomic_write(
        {cache: lambda file: torch.save({"key": key, "feats": flat, "lengths": lengths, "texts": texts}, file)},
        remove_stale=False,
    )
    return list(zip(torch.split(flat, lengths.tolist()), texts))
