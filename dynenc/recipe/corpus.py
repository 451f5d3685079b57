"""On-disk layout of the speech corpus and its manifests.

Layout of a corpus directory (written by :func:`dynenc.recipe.synthesis.synthesize_corpus`)::

    config.json               parameters the corpus was made with (cache key; written last)
    train.jsonl dev.jsonl test.jsonl
                              one JSON object per line: {"id", "path", "text", "duration",
                              "speaker" ("engine:voice"), "engine", "voice", "tempo",
                              "pitch", "rt60" (s, or null: no reverberation), "drr_db",
                              "snr_db"}; "path" is relative to the corpus directory
                              (the corpus can move)
    vocabulary.txt            the grammar's vocabulary, one word a line
    stats.json                :func:`corpus_statistics`: per split utterances, hours,
                              running and distinct words, speakers (count + list) and
                              utterances per engine; the vocabulary size and the
                              held-out speakers (in test, never in train/dev)
    wav/<split>/<id>.wav      16 kHz mono 16-bit PCM
    feats_<split>.pt          fbank cache written by :func:`dynenc.recipe.features.load_split`

Both the synthesis and the feature modules read this layout from here, so neither depends
on the other for it.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

__all__ = [
    "SAMPLE_RATE",
    "SPLITS",
    "MANIFEST_FIELDS",
    "check_split",
    "manifest_path",
    "feature_cache_path",
    "stats_path",
    "vocabulary_path",
    "corpus_statistics",
    "read_manifest",
    "prepare_output_dir",
]

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
# Fields every manifest record must carry (as strings) for the recipe to use it.
MANIFEST_FIELDS = ("id", "path", "text")


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def manifest_path(out_dir: str | os.PathLike, split: str) -> Path:
    """``out_dir/<split>.jsonl``."""
    return Path(out_dir) / f"{split}.jsonl"


def feature_cache_path(out_dir: str | os.PathLike, split: str) -> Path:
    """``out_dir/feats_<split>.pt``."""
    return Path(out_dir) / f"feats_{split}.pt"


def stats_path(out_dir: str | os.PathLike) -> Path:
    """``out_dir/stats.json``."""
    return Path(out_dir) / "stats.json"


def vocabulary_path(out_dir: str | os.PathLike) -> Path:
    """``out_dir/vocabulary.txt``."""
    return Path(out_dir) / "vocabulary.txt"


def corpus_statistics(out_dir: str | os.PathLike) -> dict:
    """Statistics of the corpus in ``out_dir``, computed from its manifests and vocabulary.

    Returns:
        ``{"splits": {split: {"utterances", "hours", "words" (running), "distinct_words",
        "speakers": {"count", "list"}, "engines": {engine: utterances}, "reverberated"
        (share of the utterances), "snr_db": [min, max], "tempo": [min, max]}},
        "vocabulary_size", "held_out_speakers"}`` -- the held-out speakers are those of
        test that occur in neither train nor dev.

    Raises:
        FileNotFoundError: a manifest or ``vocabulary.txt`` is missing.
        ValueError: a record lacks ``duration``/``speaker``/``engine`` (a corpus older
            than v2: run ``dynenc data`` again).
    """
    splits, speakers = {}, {}
    for split in SPLITS:
        records = read_manifest(out_dir, split)
        try:
            seconds = sum(float(r["duration"]) for r in records)
            speakers[split] = sorted({r["speaker"] for r in records})
            engines = Counter(r["engine"] for r in records)
            reverberated = sum(r["rt60"] is not None for r in records) / max(len(records), 1)
            snr_db, tempo = ([min(r[k] for r in records), max(r[k] for r in records)] if records else []
                             for k in ("snr_db", "tempo"))
        except KeyError as e:
            raise ValueError(f"{manifest_path(out_dir, split)}: records lack {e}; run `dynenc data` again") from None
        words = [w for r in records for w in r["text"].split()]
        splits[split] = {
            "utterances": len(records),
            "hours": round(seconds / 3600.0, 4),
            "words": len(words),
            "distinct_words": len(set(words)),
            "speakers": {"count": len(speakers[split]), "list": speakers[split]},
            "engines": dict(sorted(engines.items())),
            "reverberated": round(reverberated, 4),
            "snr_db": snr_db,
            "tempo": tempo,
        }
    vocabulary = vocabulary_path(out_dir).read_text().split()
    seen = set(speakers["train"]) | set(speakers["dev"])
    return {
        "splits": splits,
        "vocabulary_size": len(vocabulary),
        "held_out_speakers": [s for s in speakers["test"] if s not in seen],
    }


def read_manifest(out_dir: str | os.PathLike, split: str) -> list[dict]:
    """Records of ``out_dir/<split>.jsonl`` with ``"path"`` made absolute.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: a line is not a JSON object with string fields :data:`MANIFEST_FIELDS`
            (``file:line`` named).
    """
    check_split(split)
    out_dir = Path(out_dir)
    mpath = manifest_path(out_dir, split)
    if not mpath.is_file():
        raise FileNotFoundError(f"manifest {mpath} not found; run synthesize_corpus({str(out_dir)!r}) first")
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
                rec["path"] = str((out_dir / rec["path"]).resolve())
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
        raise ValueError(
            f"{name} must be a writable directory, got {str(path)!r}: {e.strerror or e}"
        ) from e
    return path
