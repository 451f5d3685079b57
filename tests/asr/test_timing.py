"""``time_budgets``: the speed measurement behind `dynenc eval`'s (and the recipe's) real-time factors."""
import itertools

import pytest
import torch

from dynenc.asr import ModelConfig, evaluate
from dynenc.asr.tokenizer import CharTokenizer

DATA = [(torch.zeros(frames, 80), "a b") for frames in (40, 60, 80)]
MAX_FRAMES = 100  # one utterance per batch


@pytest.fixture
def calls(monkeypatch):
    """Record each ``infer`` call's budget and the first draw of torch's RNG instead of running a model."""
    seen = []
    monkeypatch.setattr(evaluate, "infer", lambda model, features, lengths, budget:
                        seen.append((budget, round(torch.rand(1).item(), 6))))
    return seen


def _stub_model():
    """A stand-in model (``infer`` is replaced): only its config, which says what it reads, matters."""
    model = torch.nn.Linear(1, 1)
    model.config = ModelConfig()
    return model


def _batches():
    return len(list(evaluate.split_batches(DATA, CharTokenizer(), max_frames=MAX_FRAMES)))


def test_runs_interleave_over_the_budgets_after_a_warm_up(calls):
    batches = _batches()
    assert batches == 3
    evaluate.time_budgets(_stub_model(), DATA, CharTokenizer(), ["a", "b"], repeats=2, max_frames=MAX_FRAMES)
    budgets = [budget for budget, _ in calls]
    assert budgets[:2] == ["a", "b"]  # the untimed warm-up
    # Every repeat runs each batch under every budget in turn: a slow spell falls on both.
    assert budgets[2:] == ["a", "b"] * batches * 2


def test_each_batch_draws_the_same_random_numbers_in_every_run(calls):
    model = _stub_model()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    evaluate.time_budgets(model, DATA, CharTokenizer(), ["a", "b"], repeats=2, max_frames=MAX_FRAMES)
    timed = [draw for _, draw in calls[2:]]
    per_repeat = len(timed) // 2
    assert timed[:per_repeat] == timed[per_repeat:]                  # same masks in every repeat ...
    assert timed[0] == timed[1] and len(set(timed[:per_repeat:2])) == 3  # ... per budget, distinct per batch
    assert torch.equal(torch.random.get_rng_state(), before)       # the caller's RNG is left alone


def test_each_batch_counts_its_fastest_run(calls, monkeypatch):
    # A scripted clock: run i of the timed runs (budgets a, b alternating per batch) lasts durations[i].
    durations = iter([5, 1, 2, 7, 3, 3,    # repeat 1: (a, b) for batches 0, 1, 2
                      4, 2, 1, 1, 9, 8])   # repeat 2
    ticks = itertools.count()
    now = [0.0]

    def clock():
        # perf_counter is read twice per timed run (start, end); the warm-up reads it never.
        if next(ticks) % 2:
            now[0] += next(durations)
        return now[0]

    monkeypatch.setattr(evaluate.time, "perf_counter", clock)
    seconds = evaluate.time_budgets(_stub_model(), DATA, CharTokenizer(), ["a", "b"], repeats=2,
                                    max_frames=MAX_FRAMES)
    assert seconds == [min(5, 4) + min(2, 1) + min(3, 9), min(1, 2) + min(7, 1) + min(3, 8)]


def test_repeats_must_be_positive(calls):
    with pytest.raises(ValueError, match="repeats"):
        evaluate.time_budgets(_stub_model(), DATA, CharTokenizer(), ["a"], repeats=0)
    assert calls == []
