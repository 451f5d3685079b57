"""CTC output units for the speech corpus: characters, or sentencepiece BPE subwords.

Both tokenizers share one interface (:class:`Tokenizer`): id ``0`` is the CTC blank,
``encode(text) -> ids``, ``decode(ids) -> text`` (blanks dropped), ``decode_ctc(path)``
(greedy CTC: collapse repeats, drop blanks) and ``decoder_tokens()`` for torchaudio's
``ctc_decoder``.

Subword units are the field's standard for CTC and what gives frame skipping its regime: a
unit spans several 40 ms frames, so most frames' best label is the blank. The corpus's
units are chosen once, by ``dynenc prepare --units``, trained on the train transcripts only,
and stored beside the corpus (``units.json`` + ``units.model``); :func:`load_tokenizer`
reads them back, and a corpus without them uses characters.

Typical use::

    tokenizer = prepare_units("data/speech", "bpe256")   # trains on train.jsonl once
    tokenizer = load_tokenizer("data/speech")             # later: the same units
    ids = tokenizer.encode("the red door")                # [U] ids in [1, vocab_size)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, List, Protocol, Sequence

import torch

from ..fileio import atomic_write
from .manifest import read_manifest

__all__ = ["Tokenizer", "CharTokenizer", "SubwordTokenizer", "parse_units", "prepare_units", "load_tokenizer"]

UNITS_FILE = "units.json"
SUBWORD_MODEL_FILE = "units.model"
MIN_BPE_UNITS = 32


class Tokenizer(Protocol):
    """What training and decoding need of a tokenizer (blank = 0)."""

    blank: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str: ...

    def decode_ctc(self, ids: Iterable[int] | torch.Tensor) -> str: ...

    def decoder_tokens(self) -> List[str]: ...

    def spell(self, word: str) -> List[str]: ...


def _ids(ids: Iterable[int] | torch.Tensor) -> List[int]:
    return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


def _collapse(ids: Sequence[int]) -> List[int]:
    """A greedy CTC path with repeats collapsed (blanks kept: they separate real repeats)."""
    return [i for pos, i in enumerate(ids) if pos == 0 or i != ids[pos - 1]]


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

    def encode(self, text: str) -> List[int]:
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
        out = []
        for i in _ids(ids):
            if not 0 <= i < len(self.symbols):
                raise ValueError(f"token id {i} out of range [0, {len(self.symbols)})")
            if i != self.blank:
                out.append(self.symbols[i])
        return "".join(out)

    def decode_ctc(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Greedy CTC decoding of a frame-wise argmax path ``[T]``: collapse repeats, drop blanks."""
        return self.decode(_collapse(_ids(ids)))

    def decoder_tokens(self) -> List[str]:
        """Token strings by id for torchaudio's lexicon-free ``ctc_decoder``: blank ``"-"``,
        the space as its word boundary ``"|"``."""
        return ["-", "|"] + list(self.symbols[2:])

    def spell(self, word: str) -> List[str]:
        """``word``'s lexicon entry in :meth:`decoder_tokens`: its letters.  No boundary ``"|"``:
        targets have no space after the last word, and the decoder takes ``"|"`` between words
        as optional silence anyway."""
        return [self.symbols[i] for i in self.encode(word)]


class SubwordTokenizer:
    """Sentencepiece subword units for CTC: id ``0`` = blank, id ``i > 0`` = piece ``i - 1``.

    Args:
        model: a trained sentencepiece model file (``SentencePieceTrainer`` with
            ``unk_id=0`` and no BOS/EOS, as :func:`prepare_units` trains it).

    Raises:
        ValueError: ``model`` is missing or not a sentencepiece model (path named).
    """

    blank: int = 0

    def __init__(self, model: str | os.PathLike) -> None:
        import sentencepiece

        self.path = Path(model)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"model must be a sentencepiece model file, got {str(self.path)!r}: {e}") from None
        self._unknown = self._sp.unk_id() + 1

    @property
    def vocab_size(self) -> int:
        """Pieces + the blank."""
        return self._sp.GetPieceSize() + 1

    def encode(self, text: str) -> List[int]:
        """``text`` -> ids in ``[1, vocab_size)``; text the units cannot spell raises ``ValueError``."""
        ids = [i + 1 for i in self._sp.EncodeAsIds(text)]
        if self._unknown in ids:
            raise ValueError(f"SubwordTokenizer({str(self.path)!r}) has no units for part of {text!r}")
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """ids -> text; blanks (and the unknown piece) are dropped."""
        ids = _ids(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        return self._sp.DecodeIds([i - 1 for i in ids if i not in (self.blank, self._unknown)])

    def decode_ctc(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Greedy CTC decoding of a frame-wise argmax path ``[T]``: collapse repeats, drop blanks."""
        return self.decode(_collapse(_ids(ids)))

    def decoder_tokens(self) -> List[str]:
        """Token strings by id for torchaudio's lexicon-free ``ctc_decoder``: blank ``"-"``; the
        unknown piece, never a target, stands in for its (required) silence token ``"|"``."""
        pieces = [self._sp.IdToPiece(i) for i in range(self._sp.GetPieceSize())]
        pieces[self._sp.unk_id()] = "|"
        return ["-"] + pieces

    def spell(self, word: str) -> List[str]:
        """``word``'s lexicon entry in :meth:`decoder_tokens`: its pieces (the first carries the
        word boundary ``"\u2581"``)."""
        return [self._sp.IdToPiece(i - 1) for i in self.encode(word)]


def parse_units(units: str) -> tuple[str, int]:
    """``"char"`` -> ``("char", 0)``; ``"bpe<N>"`` -> ``("bpe", N)`` with ``N >= 32`` (the
    alphabet's 28 letters and the unknown piece are units of every BPE vocabulary).

    Raises:
        ValueError: anything else (``units`` named).
    """
    match = re.fullmatch(r"bpe(\d+)", units)
    if units == "char":
        return "char", 0
    if match and int(match.group(1)) >= MIN_BPE_UNITS:
        return "bpe", int(match.group(1))
    raise ValueError(f"units must be 'char' or 'bpe<N>' with N >= {MIN_BPE_UNITS} (e.g. 'bpe256'), got {units!r}")


def prepare_units(corpus_dir: str | os.PathLike, units: str) -> Tokenizer:
    """Choose the corpus's units and return their tokenizer; BPE is trained on the train
    transcripts only (deterministic: one thread, every sentence), once per corpus: a corpus
    whose ``units.json`` already names ``units`` for the same transcripts is left as it is.

    Raises:
        ValueError: bad ``units``, or sentencepiece cannot make ``N`` units from the transcripts.
    """
    kind, size = parse_units(units)
    corpus_dir = Path(corpus_dir)
    texts = [record["text"] for record in read_manifest(corpus_dir, "train")]
    spec = {
        "units": units,
        "train_transcripts": len(texts),
        "text_hash": hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16],
    }
    spec_path = corpus_dir / UNITS_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return load_tokenizer(corpus_dir)
    files = {spec_path: lambda file: file.write(json.dumps(spec).encode())}
    if kind == "bpe":
        import sentencepiece

        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.Train(
                sentence_iterator=iter(texts),
                model_writer=model,
                model_type="bpe",
                vocab_size=size,
                # Every letter of the corpus alphabet, seen or not, so dev/test text is always spelt.
                required_chars="".join(CharTokenizer.symbols[2:]),
                character_coverage=1.0,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"units={units!r}: sentencepiece cannot train it on {len(texts)} transcripts: {e}"
            ) from None
        files = {corpus_dir / SUBWORD_MODEL_FILE: lambda file: file.write(model.getvalue()), **files}
    atomic_write(files)  # the spec last, so a half-written pair is never taken as ready
    return load_tokenizer(corpus_dir)


def load_tokenizer(corpus_dir: str | os.PathLike) -> Tokenizer:
    """The units :func:`prepare_units` chose for ``corpus_dir`` (characters when it chose none).

    Raises:
        ValueError: ``units.json`` is unreadable or names units whose model file is missing.
    """
    spec_path = Path(corpus_dir) / UNITS_FILE
    if not spec_path.is_file():
        return CharTokenizer()
    try:
        kind, _ = parse_units(json.loads(spec_path.read_text())["units"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{spec_path}: not a units file written by `dynenc prepare`: {e}") from None
    return CharTokenizer() if kind == "char" else SubwordTokenizer(Path(corpus_dir) / SUBWORD_MODEL_FILE)
