"""Tests for recipes.synthetic_speech.sentences: the transcript grammar and its vocabulary."""
import re

import numpy as np
import pytest

from recipes.synthetic_speech import sentences as G


def test_vocabulary_size_and_spelling():
    assert len(G.VOCABULARY) >= 1000
    assert len(set(G.VOCABULARY)) == len(G.VOCABULARY)
    assert all(re.fullmatch(r"[a-z']+", w) for w in G.VOCABULARY)
    assert {"don't", "it's", "let's"} <= set(G.VOCABULARY)  # the apostrophe occurs


@pytest.mark.parametrize("template", [pytest.param(t, id=t) for t in G.TEMPLATES])
def test_template_lengths_within_bounds(template):
    lo, hi = G.template_lengths(template)
    assert G.MIN_WORDS <= lo <= hi <= G.MAX_WORDS


def test_every_word_reachable():
    """Every word class is used by a template, so each vocabulary word can be drawn."""
    used = {tok.rstrip("?") for t in G.TEMPLATES for tok in t.split()}
    assert set(G.WORD_CLASSES) <= used
    reachable = {w for tok in used for w in (G.WORD_CLASSES[tok] if tok.isupper() else (tok,))} | {"an"}
    assert reachable == set(G.VOCABULARY)


def test_sentences_use_vocabulary_and_are_deterministic():
    rng = np.random.default_rng(0)
    drawn = [G.sentence(rng) for _ in range(2000)]
    vocab = set(G.VOCABULARY)
    for s in drawn:
        words = s.split(" ")
        assert G.MIN_WORDS <= len(words) <= G.MAX_WORDS, s
        assert set(words) <= vocab, s
    assert len({w for s in drawn for w in s.split()}) > 600  # draws spread over the vocabulary
    assert len(set(drawn)) > 1900
    again = np.random.default_rng(0)
    assert [G.sentence(again) for _ in range(2000)] == drawn
