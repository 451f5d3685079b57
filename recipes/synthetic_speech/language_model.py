"""A word n-gram language model of the corpus's text, for the CTC beam search.

KenLM's ``lmplz`` (the field's standard estimator; ``make kenlm`` builds it into the
virtual environment) estimates a modified Kneser-Ney model in ARPA format, which
torchaudio's ``ctc_decoder`` reads. Its text is the training split's transcripts plus,
optionally, more sentences of the corpus's grammar (:func:`~recipes.synthetic_speech.sentences.sentence`):
as in the field, where an LM reads far more in-domain text than the acoustic model hears
(LibriSpeech's LM corpus is ~80x its transcripts). No dev or test transcript goes in: the
dev split chooses the LM weight and the test split is never seen.

Typical use::

    arpa = ngram_lm(Path("data/speech"), order=3, grammar_sentences=200_000)   # data/speech/lm3-<digest>.arpa
    BeamSearch(tokenizer, 32, lexicon=words, lm=arpa, lm_weight=1.0)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from dynenc.fileio import atomic_write
from dynenc.validation import check_int
from dynenc.asr.manifest import read_manifest

from .sentences import sentence

__all__ = ["GRAMMAR_SEED", "find_lmplz", "grammar_text", "ngram_lm"]

# The grammar sentences' random stream: apart from the corpus's per-utterance streams (which
# are keyed on (seed, split, index)), fixed so the LM text is the same on every machine.
GRAMMAR_SEED = 7919


def find_lmplz() -> Optional[str]:
    """Path of KenLM's ``lmplz``: the virtual environment's first (where ``make kenlm`` puts
    it), then ``PATH``; ``None`` when neither has it."""
    return shutil.which("lmplz", path=os.pathsep.join([str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")]))


def grammar_text(data: Path, count: int) -> List[str]:
    """``count`` sentences of the corpus grammar (seeded with :data:`GRAMMAR_SEED`), leaving out
    every sentence that is a dev or test transcript of ``data``.

    Raises:
        FileNotFoundError: ``data`` has no dev or test manifest.
    """
    held_out = {record["text"] for split in ("dev", "test") for record in read_manifest(data, split)}
    rng = np.random.default_rng(GRAMMAR_SEED)
    text: List[str] = []
    while len(text) < count:
        line = sentence(rng)
        if line not in held_out:
            text.append(line)
    return text


def ngram_lm(data: Path, order: int = 3, grammar_sentences: int = 0) -> Path:
    """``data/lm<order>-<digest>.arpa``: an ``order``-gram model of the training transcripts
    and ``grammar_sentences`` sentences of :func:`grammar_text`, built on the first call and
    reused while its text is the same (``digest``: of the text, so a corpus rebuilt in place
    gets a new model); lmplz is deterministic, so a rebuilt file is the same.

    ``--discount_fallback``: a corpus of a few thousand sentences has too few singletons
    for lmplz to estimate every order's Kneser-Ney discounts, so it uses its defaults there.

    Raises:
        ValueError: ``order`` < 2, ``grammar_sentences`` < 0, or ``lmplz`` is not installed
            (``make kenlm``) or fails.
        FileNotFoundError: ``data`` has no training manifest (nor, with ``grammar_sentences``,
            a dev or test manifest).
    """
    check_int("order", order, low=2)
    check_int("grammar_sentences", grammar_sentences, low=0)
    lines = [record["text"] for record in read_manifest(data, "train")]
    if grammar_sentences:
        lines += grammar_text(data, grammar_sentences)
    text = "".join(line + "\n" for line in lines)
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
