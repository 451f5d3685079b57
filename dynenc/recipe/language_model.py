"""A word n-gram language model of the corpus's training transcripts, for the CTC beam search.

KenLM's ``lmplz`` (the field's standard estimator; ``make kenlm`` builds it into the
virtual environment) estimates a modified Kneser-Ney model in ARPA format, which
torchaudio's ``ctc_decoder`` reads. Only the training split's transcripts go in: the dev
split chooses the LM weight and the test split is never seen.

Typical use::

    arpa = ngram_lm(Path("data/speech"), order=3)    # data/speech/lm3-<digest>.arpa, built once
    BeamSearch(tokenizer, 32, lexicon=words, lm=arpa, lm_weight=1.0)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..fileio import atomic_write
from ..validation import check_int
from .corpus import read_manifest

__all__ = ["find_lmplz", "ngram_lm"]


def find_lmplz() -> Optional[str]:
    """Path of KenLM's ``lmplz``: the virtual environment's first (where ``make kenlm`` puts
    it), then ``PATH``; ``None`` when neither has it."""
    return shutil.which("lmplz", path=os.pathsep.join([str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")]))


def ngram_lm(data: Path, order: int = 3) -> Path:
    """``data/lm<order>-<digest>.arpa``: an ``order``-gram model of the training transcripts,
    built on the first call and reused while the transcripts are the same (``digest``: of
    their text, so a corpus rebuilt in place gets a new model); lmplz is deterministic, so
    a rebuilt file is the same.

    ``--discount_fallback``: a corpus of a few thousand sentences has too few singletons
    for lmplz to estimate every order's Kneser-Ney discounts, so it uses its defaults there.

    Raises:
        ValueError: ``order`` < 2, or ``lmplz`` is not installed (``make kenlm``) or fails.
        FileNotFoundError: ``data`` has no training manifest.
    """
    check_int("order", order, low=2)
    text = "".join(record["text"] + "\n" for record in read_manifest(data, "train"))
    path = Path(data) / f"lm{order}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.arpa"
    if path.is_file():
        return path
    lmplz = find_lmplz()
    if lmplz is None:
        raise ValueError("KenLM's lmplz is not installed (needed for the n-gram language model): run `make kenlm`")
    done = subprocess.run([lmplz, "-o", str(order), "--discount_fallback", "-S", "10%"], input=text.encode(),
                          capture_output=True)
    if done.returncode != 0:
        raise ValueError(f"lmplz failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()[-500:]}")
    atomic_write({path: lambda file: file.write(done.stdout)})
    return path
