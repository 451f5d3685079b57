"""Tests for dynenc.recipe.tokenizer: the CTC character vocabulary."""
import pytest
import torch

from dynenc.recipe.synthesis import VOCABULARY
from dynenc.recipe.tokenizer import CharTokenizer


def test_tokenizer_round_trip_and_errors():
    tok = CharTokenizer()
    assert tok.vocab_size == 29 and tok.blank == 0
    text = "don't turn left it's zero"
    ids = tok.encode(text)
    assert 0 not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode(" ") == [1] and tok.encode("'") == [2] and tok.encode("az") == [3, 28]
    assert tok.encode("GO") == tok.encode("go")
    for w in VOCABULARY:  # every corpus word must be encodable
        assert tok.decode(tok.encode(w)) == w
    with pytest.raises(ValueError, match=r"'7'"):
        tok.encode("go 7")
    with pytest.raises(ValueError, match=r"'!'"):
        tok.encode("stop!")
    with pytest.raises(ValueError):
        tok.decode([29])
    # Greedy CTC path: blanks separate repeats.
    path = [0, 9, 9, 0, 6, 0, 14, 14, 0, 14, 17, 0]  # g g _ d _ l l _ l o
    assert tok.decode_ctc(path) == "gdllo"
    assert tok.decode_ctc(torch.tensor(path)) == "gdllo"
