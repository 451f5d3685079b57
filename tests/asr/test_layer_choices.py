"""``decode_split``'s layer-choice statistics: how much a method's per-sample layer masks vary
over a split (is an input-conditioned selector conditioned on its input?)."""
from collections import Counter

import pytest
import torch

from dynenc.asr import CTCModel, ModelConfig
from dynenc.methods import FullBudget, LayerDropBudget, SelectorBudget
from dynenc.asr.evaluate import decode_split, mask_statistics, mask_string
from dynenc.asr.tokenizer import CharTokenizer

LAYERS = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CTCModel(ModelConfig(vocab_size=CharTokenizer().vocab_size, num_features=80, dim=32, num_heads=4,
                                ffn_dim=64, num_layers=LAYERS, kernel_size=5, dropout=0.0, selector_hidden=16)).eval()


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(frames, 80, generator=generator) * scale, "a b")
            for frames, scale in zip((40, 56, 72, 88, 104, 120), (0.1, 1.0, 3.0, 0.3, 2.0, 5.0))]


def test_mask_string_lists_layer_one_first():
    assert mask_string([False, True, False, True]) == "0101"


def test_statistics_count_distinct_masks_and_the_most_common_ones_share():
    stats = mask_statistics(Counter({"0101": 3, "1100": 1}))
    assert stats == {"distinct_masks": 2, "top_mask": "0101", "top_mask_share": 0.75}
    # Of equally common masks, the first in text order, whatever order the samples came in.
    for order in (["1100", "0101"], ["0101", "1100"]):
        assert mask_statistics(Counter(order))["top_mask"] == "0101"
    assert mask_statistics(Counter()) == {"distinct_masks": None, "top_mask": None, "top_mask_share": None}


@pytest.mark.parametrize("budget, distinct, top", [
    pytest.param(FullBudget(), None, None, id="full-depth-chooses-nothing"),
    pytest.param(LayerDropBudget(2), 1, "0101", id="evenly-spaced-is-one-fixed-mask"),
])
def test_fixed_budgets(model, data, budget, distinct, top):
    scores = decode_split(model, data, CharTokenizer(), budget)
    assert scores["distinct_masks"] == distinct and scores["top_mask"] == top
    assert scores["top_mask_share"] == (None if distinct is None else 1.0)


def test_selector_masks_are_counted_per_utterance(model, data):
    # Each utterance's own top-2 of the selector's logits, recomputed here from the selector alone.
    with torch.no_grad():
        expected = Counter()
        for features, _ in data:
            x, lengths = model.embed(features[None], torch.tensor([features.shape[0]]))
            logits = model.selector(x, lengths, 2)[0]
            expected[mask_string((logits >= logits.topk(2).values[-1]).tolist())] += 1
    scores = decode_split(model, data, CharTokenizer(), SelectorBudget(k=2), max_frames=200)
    assert scores == {**scores, **mask_statistics(expected)}
    assert scores["distinct_masks"] > 1 and all(mask.count("1") == 2 for mask in expected)
