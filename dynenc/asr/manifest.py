"""The manifest format ``dynenc train`` / ``dynenc eval`` read: any corpus, one directory.

A data directory holds one manifest per split::

    train.jsonl dev.jsonl test.jsonl
        one JSON object per line with string fields "id" (unique utterance id), "path" (the
        audio file: relative to the data directory, or absolute) and "text" (the transcript,
        lower-case letters, apostrophes and spaces for the character units); other fields
        are kept and ignored. Blank lines are skipped.
    units.json [+ units.model]
        the CTC units chosen by ``dynenc prepare --units`` (characters when absent)
    feats_<split>.pt
        the fbank cache :func:`dynenc.asr.features.load_split` writes

Example line::

    {"id": "utt-0001", "path": "wav/utt-0001.flac", "text": "turn the red light on"}

Audio is anything libsndfile reads (WAV, FLAC, OGG, ...), mono or multi-channel (averaged),
at 16 kHz: fbank is computed at a file's own rate, which moves the mel filters' range, so
resample other rates first.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = [
    "SPLITS",
    "MANIFEST_FIELDS",
    "check_split",
    "manifest_path",
    "feature_cache_path",
    "read_manifest",
    "prepare_output_dir",
]

SPLITS = ("train", "dev", "test")
# Fields every manifest record must carry, as strings.
MANIFEST_FIELDS = ("id", "path", "text")


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def manifest_path(data_dir: str | os.PathLike, split: str) -> Path:
    """``data_dir/<split>.jsonl``."""
    return Path(data_dir) / f"{split}.jsonl"


def feature_cache_path(data_dir: str | os.PathLike, split: str, kind: str = "fbank") -> Path:
    """``data_dir/feats_<split>.pt`` (fbank) or ``data_dir/waves_<split>.pt`` (16 kHz waveforms)."""
    return Path(data_dir) / f"{'feats' if kind == 'fbank' else 'waves'}_{split}.pt"


def read_manifest(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Records of ``data_dir/<split>.jsonl`` with ``"path"`` made absolute.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: a line is not a JSON object with string fields :data:`MANIFEST_FIELDS`
            (``file:line`` named).
    """
    check_split(split)
    data_dir = Path(data_dir)
    mpath = manifest_path(data_dir, split)
    if not mpath.is_file():
        raise FileNotFoundError(
            f"manifest {mpath} not found: a data directory holds train.jsonl, dev.jsonl and "
            "test.jsonl (see dynenc.asr.manifest)"
        )
    records = []
    with open(mpath) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                missing = [k for k in MANIFEST_FIELDS if not isinstance(rec.get(k), str)]
                if missing:
                    raise ValueError(f"fields {missing} must be strings, got {rec!r}")
                rec["path"] = str((data_dir / rec["path"]).resolve())
            except (ValueError, AttributeError) as e:  # AttributeError: the line is not an object
                raise ValueError(f"{mpath}:{lineno}: bad manifest line: {e}") from None
            records.append(rec)
    return records


def prepare_output_dir(path: str | os.PathLike, name: str) -> Path:
    """Create ``path`` if needed and check that files can be written in it.

    Args:
        path: the directory.
        name: how the caller calls it (``"out_dir"``, ``"--out-dir"``), for the error.

    Raises:
        ValueError: ``path`` cannot be created or written (``name``, the path and the
            reason are named).  Probed by creating a file, which, unlike ``os.access``,
            also catches read-only file systems and holds for root.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{name} must be a writable directory, got {str(path)!r}: {e.strerror or e}") from e
    return path
