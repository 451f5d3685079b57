"""``python -m recipes.synthetic_speech data``: synthesise the speech corpus (cached), then
prepare it as any data directory (:func:`dynenc.asr.prepare.prepare_data`: units, fbank).

The synthesis lives in :mod:`.synthesis`; this module is only the command line.
"""
from __future__ import annotations

import argparse
import os
import sys

from dynenc.asr.features import load_split
from dynenc.asr.manifest import prepare_output_dir
from dynenc.asr.tokenizer import parse_units, prepare_units

from .corpus import corpus_statistics, stats_path
from .reproduce import RecipePlan
from .synthesis import check_int_at_least, synthesize_corpus

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the ``data`` command."""
    p.add_argument("--out-dir", default="data/speech", help="corpus directory (default: data/speech)")
    plan = RecipePlan()  # the recipe's corpus by default
    p.add_argument("--num-train", type=int, default=plan.num_train, help=f"train utterances (default {plan.num_train})")
    p.add_argument("--num-dev", type=int, default=plan.num_dev, help=f"dev utterances (default {plan.num_dev})")
    p.add_argument("--num-test", type=int, default=plan.num_test, help=f"test utterances (default {plan.num_test})")
    p.add_argument("--seed", type=int, default=0, help="seeds the sentences, voices and noise (default 0)")
    p.add_argument("--units", default=plan.units, help="CTC units trained on the train transcripts: char or bpe<N> "
                   f"(default {plan.units})")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="synthesis processes (default: the CPU count)")
    p.add_argument("--no-features", action="store_true", help="skip computing and caching fbank features")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_arguments(a: argparse.Namespace) -> None:
    """Reject bad flags before any work, naming the flag, its value and what is expected."""
    for flag, value, minimum in (
        ("--num-train", a.num_train, 0),
        ("--num-dev", a.num_dev, 0),
        ("--num-test", a.num_test, 0),
        ("--seed", a.seed, 0),
        ("--workers", a.workers, 1),
    ):
        check_int_at_least(flag, value, minimum)
    parse_units(a.units)
    prepare_output_dir(a.out_dir, "--out-dir")


def run(a: argparse.Namespace) -> int:
    """``data [--out-dir DIR] [--num-train N ...]``: synthesise (cached) + features.

    Prints one line per split (manifest, utterances, hours, speakers) and the path of
    ``stats.json``.  Returns the exit status.

    Raises:
        ValueError: a flag is out of range, ``--out-dir`` is not writable, an engine is
            missing, or the corpus holds bad audio or transcripts (all named).
    """
    _check_arguments(a)
    try:
        manifests = synthesize_corpus(
            a.out_dir, a.num_train, a.num_dev, a.num_test, a.seed, a.workers, progress=not a.quiet
        )
    except RuntimeError as e:  # a synthesis engine itself failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = corpus_statistics(a.out_dir)
    tokenizer = prepare_units(a.out_dir, a.units)
    for split, path in manifests.items():
        if not a.no_features:
            load_split(a.out_dir, split, progress=not a.quiet, tokenizer=tokenizer)
        s = stats["splits"][split]
        print(f"{split}: {path} ({s['utterances']} utterances, {s['hours']:.2f} h, "
              f"{s['speakers']['count']} speakers)")
    print(f"stats: {stats_path(a.out_dir)}")
    return 0

