"""``time_budgets``: the speed measurement behind the recipe's real-time factors."""
import pytest
import torch

from dynenc.recipe import evaluate
from dynenc.recipe.tokenizer import CharTokenizer

DATA = [(torch.zeros(frames, 80), "a b") for frames in (40, 60, 80)]


@pytest.fixture
def calls(monkeypatch):
    """Record which budget each ``infer`` call ran instead of running a model."""
    seen = []
    monkeypatch.setattr(evaluate, "infer", lambda model, features, lengths, budget: seen.append(budget))
    return seen


def test_repeats_go_round_robin_over_the_budgets(calls):
    model = torch.nn.Linear(1, 1)
    batches = len(list(evaluate.split_batches(DATA, CharTokenizer(), max_frames=100)))
    assert batches > 1
    seconds = evaluate.time_budgets(model, DATA, CharTokenizer(), ["a", "b"], repeats=2, max_frames=100)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    # Every repeat times each budget in turn, so a slow spell of the machine falls on both.
    assert calls == (["a"] * batches + ["b"] * batches) * 2


def test_repeats_must_be_positive(calls):
    with pytest.raises(ValueError, match="repeats"):
        evaluate.time_budgets(torch.nn.Linear(1, 1), DATA, CharTokenizer(), ["a"], repeats=0)
    assert calls == []
