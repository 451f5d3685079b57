"""Character tokenizer for CTC over the speech corpus's transcripts."""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["CharTokenizer"]


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
