"""On-disk layout of the speech corpus and its manifests.

Layout of a corpus directory (written by :func:`.synthesis.synthesize_corpus`)::

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
    feats_<split>.pt          fbank cache written by :func:`dynenc.asr.features.load_split`

A corpus directory is a python -m recipes.synthetic_speech data directory (:mod:`dynenc.asr.manifest`: the manifests,
units and feature caches) with the synthesis's own files beside it.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from dynenc.asr.manifest import SPLITS, manifest_path, read_manifest

__all__ = ["stats_path", "vocabulary_path", "corpus_statistics"]


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
            than v2: run ``python -m recipes.synthetic_speech data`` again).
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
            raise ValueError(f"{manifest_path(out_dir, split)}: records lack {e}; run `python -m recipes.synthetic_speech data` again") from None
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
