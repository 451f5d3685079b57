"""``dynenc prepare``: make a data directory ready for ``dynenc train`` / ``dynenc eval``.

Checks every manifest (:mod:`dynenc.asr.manifest`), trains the CTC units on the train
transcripts (``--units``; characters or sentencepiece BPE, :mod:`dynenc.asr.tokenizer`)
and computes the fbank cache of every split, so that a bad line, a missing or unreadable
audio file or an unspellable transcript is reported before training starts.

Typical use::

    dynenc prepare --data data/mycorpus --units bpe256
    dynenc train --data data/mycorpus --method dld --out runs/dld
"""

from __future__ import annotations

import argparse
import os
from typing import Dict

from .features import load_split
from .manifest import SPLITS, manifest_path, read_manifest
from .tokenizer import parse_units, prepare_units

__all__ = ["prepare_data", "add_arguments", "run"]


def prepare_data(data_dir: str | os.PathLike, units: str = "char", progress: bool = True) -> Dict[str, int]:
    """Choose ``data_dir``'s units and cache every split's features.

    Args:
        data_dir: a data directory with ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl``.
        units: ``"char"`` or ``"bpe<N>"``, trained on the train transcripts once.
        progress: tqdm bars while features are computed.

    Returns:
        utterances per split.

    Raises:
        FileNotFoundError: a manifest is missing.
        ValueError: bad ``units``, a malformed manifest line, or an utterance whose audio or
            transcript cannot be used (manifest, utterance and file named).
    """
    parse_units(units)
    for split in SPLITS:  # every manifest read (and checked line by line) before any work
        read_manifest(data_dir, split)
    tokenizer = prepare_units(data_dir, units)
    return {split: len(load_split(data_dir, split, progress=progress, tokenizer=tokenizer)) for split in SPLITS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data directory holding train.jsonl, dev.jsonl, test.jsonl")
    parser.add_argument(
        "--units",
        default="char",
        help="CTC units trained on the train transcripts: char or bpe<N>, N >= 32 (default char)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    counts = prepare_data(args.data, args.units, progress=not args.quiet)
    for split, count in counts.items():
        print(f"{split}: {manifest_path(args.data, split)} ({count} utterances)")
    return 0
