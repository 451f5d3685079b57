"""Tests for recipes.synthetic_speech.language_model (KenLM n-gram LM of the training transcripts and grammar
sentences) and the beam search that it scores."""
import json
import re

import pytest

from ctc_emissions import spelled
from recipes.synthetic_speech import language_model
from dynenc.asr.evaluate import BeamSearch
from recipes.synthetic_speech.language_model import find_lmplz, grammar_text, ngram_lm
from dynenc.asr.tokenizer import CharTokenizer

needs_lmplz = pytest.mark.skipif(find_lmplz() is None, reason="KenLM's lmplz is not built (make kenlm)")

TRANSCRIPTS = ["the red door opens", "a red door", "the red door", "open the red door", "a rod"]
HELD_OUT = {"dev": ["a blue door"], "test": ["the green door opens"]}


def _transcripts(root, texts=TRANSCRIPTS, held_out=None):
    """A corpus directory whose training manifest holds ``texts`` (and ``{split: texts}`` of ``held_out``)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, lines in {"train": texts, **(held_out or {})}.items():
        (root / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": f"{split}_{i:05d}", "path": "x.wav", "text": text}) + "\n" for i, text in enumerate(lines)))
    return root


def _unigrams(arpa_text):
    section = arpa_text.split("\\1-grams:")[1].split("\\2-grams:")[0]
    return {line.split("\t")[1] for line in section.strip().splitlines()}


@needs_lmplz
@pytest.mark.parametrize("order", [2, 3])
def test_ngram_lm_is_built_once_from_the_training_transcripts(tmp_path, order):
    root = _transcripts(tmp_path / "a")
    arpa = ngram_lm(root, order)
    assert arpa.parent == root and arpa.name.startswith(f"lm{order}-") and arpa.suffix == ".arpa"
    text = arpa.read_text()
    assert [int(n) for n, _ in re.findall(r"ngram (\d+)=(\d+)", text)] == list(range(1, order + 1))
    assert _unigrams(text) == {w for t in TRANSCRIPTS for w in t.split()} | {"<s>", "</s>", "<unk>"}
    stamp = arpa.stat().st_mtime_ns
    assert ngram_lm(root, order) == arpa and arpa.stat().st_mtime_ns == stamp  # cached
    assert ngram_lm(_transcripts(tmp_path / "b"), order).read_text() == text   # deterministic
    changed = ngram_lm(_transcripts(root, TRANSCRIPTS[:-1]), order)            # a corpus rebuilt in place
    assert changed != arpa and "rod" not in _unigrams(changed.read_text())


def test_grammar_text_leaves_out_every_dev_and_test_sentence(tmp_path, monkeypatch):
    root = _transcripts(tmp_path, held_out=HELD_OUT)
    drawn = iter(["a blue door", "a red rod", "the green door opens", "open a door"] * 3)
    monkeypatch.setattr(language_model, "sentence", lambda rng: next(drawn))
    assert grammar_text(root, 4) == ["a red rod", "open a door"] * 2
    assert grammar_text(root, 0) == []


def test_grammar_text_is_the_corpus_grammar_and_deterministic(tmp_path):
    root = _transcripts(tmp_path, held_out=HELD_OUT)
    text = grammar_text(root, 200)
    assert len(text) == 200 and text == grammar_text(root, 200) and len(set(text)) > 150
    assert all(3 <= len(line.split()) <= 9 for line in text) and not set(text) & {t for v in HELD_OUT.values() for t in v}


@needs_lmplz
def test_ngram_lm_adds_grammar_sentences_to_the_transcripts(tmp_path):
    root = _transcripts(tmp_path, held_out=HELD_OUT)
    plain, extended = ngram_lm(root, 3), ngram_lm(root, 3, grammar_sentences=50)
    assert extended != plain and extended.name.startswith("lm3-")
    transcript_words = {w for t in TRANSCRIPTS for w in t.split()}
    grammar_words = {w for line in grammar_text(root, 50) for w in line.split()}
    assert _unigrams(extended.read_text()) - _unigrams(plain.read_text()) == grammar_words - transcript_words


def test_ngram_lm_rejects(tmp_path, monkeypatch):
    root = _transcripts(tmp_path)
    with pytest.raises(ValueError, match="order must be >= 2"):
        ngram_lm(root, 1)
    with pytest.raises(ValueError, match="grammar_sentences must be >= 0"):
        ngram_lm(root, 2, grammar_sentences=-1)
    with pytest.raises(FileNotFoundError):
        ngram_lm(root, 2, grammar_sentences=10)  # no dev / test manifest to leave out
    with pytest.raises(FileNotFoundError):
        ngram_lm(tmp_path / "empty", 2)
    monkeypatch.setattr(language_model, "find_lmplz", lambda: None)
    with pytest.raises(ValueError, match="make kenlm"):
        ngram_lm(root, 2)
    assert not list(root.glob("*.arpa"))


@needs_lmplz
def test_language_model_settles_what_the_acoustics_leave_open(tmp_path):
    tok = CharTokenizer()
    arpa = ngram_lm(_transcripts(tmp_path), 2)
    text = "the red door"
    ids = tok.encode(text)
    log_probs, lengths = spelled(tok, ids)
    # On the frame of "red"'s "e" (two frames per unit), "o" (spelling the lexicon word "rod") is slightly ahead.
    frame = 2 * (text.index("red") + 1)
    log_probs[0, frame, tok.encode("e")[0]], log_probs[0, frame, tok.encode("o")[0]] = -0.8, -0.6
    lexicon = ["the", "red", "rod", "door", "a", "opens", "open"]
    assert BeamSearch(tok, 8, lexicon)(log_probs, lengths) == ["the rod door"]
    assert BeamSearch(tok, 8, lexicon, lm=arpa, lm_weight=1.0)(log_probs, lengths) == [text]
    assert BeamSearch(tok, 8, lexicon, lm=arpa, lm_weight=0.0)(log_probs, lengths) == ["the rod door"]


def test_beam_search_rejects_a_language_model_it_cannot_use(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="needs a lexicon"):
        BeamSearch(tok, 8, lexicon=None, lm=tmp_path / "lm.arpa")
    with pytest.raises(FileNotFoundError, match="missing.arpa does not exist"):
        BeamSearch(tok, 8, lexicon=["a"], lm=tmp_path / "missing.arpa")
    with pytest.raises(ValueError, match="lm_weight must be >= 0"):
        BeamSearch(tok, 8, lexicon=["a"], lm_weight=-1.0)


@needs_lmplz
def test_loading_the_language_model_prints_nothing(tmp_path, capfd):
    arpa = ngram_lm(_transcripts(tmp_path), 2)
    BeamSearch(CharTokenizer(), 8, ["the", "red"], lm=arpa)
    assert capfd.readouterr() == ("", "")
