"""Tests for dynenc.asr.tokenizer: the CTC character vocabulary."""
import pytest
import torch

from recipes.synthetic_speech.synthesis import VOCABULARY
from dynenc.asr.tokenizer import CharTokenizer


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


# ----------------------------------------------------------------------------- subword units

import json

from ctc_emissions import spelled
from dynenc.asr.evaluate import BeamSearch
from dynenc.asr.tokenizer import SubwordTokenizer, load_tokenizer, parse_units, prepare_units

WORDS = ("the red door opens slowly near a quiet river while seven green birds sing about "
         "winter morning light don't stop it's fine").split()


def _corpus(tmp_path, sentences=200, seed=0):
    rng = torch.Generator().manual_seed(seed)
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(sentences):
            n = int(torch.randint(3, 9, (), generator=rng))
            text = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=rng))
            f.write(json.dumps({"id": f"train_{i:05d}", "path": "x.wav", "text": text}) + "\n")
    return tmp_path


@pytest.mark.parametrize("units, expected", [("char", ("char", 0)), ("bpe32", ("bpe", 32)), ("bpe256", ("bpe", 256))])
def test_parse_units(units, expected):
    assert parse_units(units) == expected


@pytest.mark.parametrize("units", ["bpe", "bpe31", "BPE64", "word", "bpe-1", ""])
def test_parse_units_rejects(units):
    with pytest.raises(ValueError, match="units must be"):
        parse_units(units)


def test_subword_units_round_trip_and_cache(tmp_path):
    corpus = _corpus(tmp_path)
    tok = prepare_units(corpus, "bpe40")
    assert isinstance(tok, SubwordTokenizer) and tok.vocab_size == 41 and tok.blank == 0
    for line in (corpus / "train.jsonl").read_text().splitlines()[:50]:
        text = json.loads(line)["text"]
        ids = tok.encode(text)
        assert 0 not in ids and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    # A greedy CTC path: blanks separate a real repeat, repeats collapse.
    a, b = tok.encode("the red")[:2]
    assert tok.decode_ctc([0, a, a, 0, b, b, 0, b]) == tok.decode([a, b, b])
    # Prepared once: the same units for the same transcripts are not retrained...
    model = corpus / "units.model"
    stamp = model.stat().st_mtime_ns
    assert prepare_units(corpus, "bpe40").encode("the red door") == tok.encode("the red door")
    assert model.stat().st_mtime_ns == stamp
    assert load_tokenizer(corpus).encode("seven green birds") == tok.encode("seven green birds")
    # ...new transcripts retrain them.
    _corpus(tmp_path, seed=1)
    prepare_units(corpus, "bpe40")
    assert model.stat().st_mtime_ns != stamp


def test_subword_units_errors(tmp_path):
    corpus = _corpus(tmp_path)
    tok = prepare_units(corpus, "bpe40")
    assert tok.decode(tok.encode("zebra")) == "zebra"  # letters the transcripts never use are units too
    with pytest.raises(ValueError, match="no units"):
        tok.encode("café")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="cannot train"):
        prepare_units(corpus, "bpe5000")  # more units than the transcripts can make
    (corpus / "units.json").write_text("{")
    with pytest.raises(ValueError, match="units.json"):
        load_tokenizer(corpus)
    with pytest.raises(ValueError, match="sentencepiece model"):
        SubwordTokenizer(corpus / "missing.model")


def test_char_units_and_default(tmp_path):
    corpus = _corpus(tmp_path)
    assert isinstance(load_tokenizer(corpus), CharTokenizer)  # no units chosen: characters
    assert isinstance(prepare_units(corpus, "char"), CharTokenizer)
    assert isinstance(load_tokenizer(corpus), CharTokenizer)


@pytest.mark.parametrize("units", ["char", "bpe40"])
def test_beam_search_spells_the_path(tmp_path, units):
    tok = prepare_units(_corpus(tmp_path), units)
    tokens = tok.decoder_tokens()
    assert len(tokens) == tok.vocab_size and tokens[0] == "-" and "|" in tokens
    text = "the red door"
    assert BeamSearch(tok, 4)(*spelled(tok, tok.encode(text))) == [text]


@pytest.mark.parametrize("trailing_blank", [True, False], ids=["blank_after_last", "last_on_final_frame"])
@pytest.mark.parametrize("units", ["char", "bpe40"])
def test_lexicon_search_maps_a_misspelling_to_its_word(tmp_path, units, trailing_blank):
    tok = prepare_units(_corpus(tmp_path), units)
    text = "the red door"
    ids = tok.encode(text)
    log_probs, lengths = spelled(tok, ids, trailing_blank)
    # The last unit's frame: "x" (a letter unit of every vocabulary) wins, the right unit is close behind.
    last = 2 * (len(ids) - 1)
    log_probs[0, last, ids[-1]], log_probs[0, last, tok.decoder_tokens().index("x")] = -1.0, -0.5
    [free] = BeamSearch(tok, 8)(log_probs, lengths)
    assert free != text and free.endswith("x")
    assert BeamSearch(tok, 8, lexicon=["the", "red", "door", "dog", "rod"])(log_probs, lengths) == [text]


@pytest.mark.parametrize("units", ["char", "bpe40"])
def test_lexicon_search_returns_only_lexicon_words(tmp_path, units):
    tok = prepare_units(_corpus(tmp_path), units)
    x = tok.decoder_tokens().index("x")
    # Two frames cannot spell "there": no word is completed, and no unit leaks into the text.
    assert BeamSearch(tok, 8, lexicon=["there"])(*spelled(tok, [x])) == [""]
    with pytest.raises(ValueError, match="beam_size"):
        BeamSearch(tok, 0)


@pytest.mark.parametrize("units", ["char", "bpe40"])
def test_spell_rejects_what_the_units_cannot_spell(tmp_path, units):
    with pytest.raises(ValueError, match="caf"):
        prepare_units(_corpus(tmp_path), units).spell("caf\u00e9")
