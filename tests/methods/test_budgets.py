"""Typed budgets: each validates its own fields (naming the field, the value and what was
expected) and checks the model it runs on."""
import math

import pytest

from dynenc.methods import (BlankSkipBudget, EarlyExitBudget, FullBudget, LayerDropBudget, SelectorBudget,
                            get_method, infer)
from toy_ctc import tiny_model, toy_batch


def test_budget_validation():
    model = tiny_model()
    features, lengths, _, _ = toy_batch(0, batch_size=2)
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("magic")
    with pytest.raises(TypeError, match="budget must be one of"):
        infer(model, features, lengths, "magic")
    with pytest.raises(TypeError, match="layers"):
        LayerDropBudget()
    with pytest.raises(ValueError, match="exactly one of threshold and fixed_exit"):
        EarlyExitBudget()
    with pytest.raises(TypeError, match="threshold"):
        BlankSkipBudget()
    with pytest.raises(ValueError, match="layer selector"):
        infer(model, features, lengths, SelectorBudget(k=2))
    with pytest.raises(ValueError, match="blank head"):
        infer(model, features, lengths, BlankSkipBudget(threshold=0.9))


BAD_BUDGETS = [
    pytest.param(lambda: LayerDropBudget(2.0), TypeError, r"LayerDropBudget.layers must be an int, got 2.0",
                 id="layer_drop-float-layers"),
    pytest.param(lambda: LayerDropBudget(True), TypeError, r"LayerDropBudget.layers must be an int, got True",
                 id="layer_drop-bool-layers"),
    pytest.param(lambda: LayerDropBudget(-1), ValueError, r"LayerDropBudget.layers must be >= 0, got -1",
                 id="layer_drop-negative-layers"),
    pytest.param(lambda: LayerDropBudget(2, "middle"), ValueError,
                 r"LayerDropBudget.strategy must be one of .*'middle'",
                 id="layer_drop-unknown-strategy"),
    pytest.param(lambda: SelectorBudget(), ValueError,
                 r"SelectorBudget needs exactly one of k and threshold, got neither",
                 id="selector-neither"),
    pytest.param(lambda: SelectorBudget(k=2, threshold=0.5), ValueError,
                 r"exactly one of k and threshold, got k, threshold",
                 id="selector-both"),
    pytest.param(lambda: SelectorBudget(k=-1), ValueError,
                 r"SelectorBudget.k must be >= 0, got -1", id="selector-negative-k"),
    pytest.param(lambda: SelectorBudget(k="2"), TypeError,
                 r"SelectorBudget.k must be an int, got '2'", id="selector-str-k"),
    pytest.param(lambda: SelectorBudget(threshold=1.0), ValueError,
                 r"SelectorBudget.threshold must lie in \(0, 1\), got 1.0",
                 id="selector-threshold-one"),
    pytest.param(lambda: SelectorBudget(k=2, target=1), ValueError, r"SelectorBudget.target is the threshold mode's",
                 id="selector-target-with-k"),
    pytest.param(lambda: SelectorBudget(threshold=0.5, target=-1), ValueError, r"SelectorBudget.target must be >= 0",
                 id="selector-negative-target"),
    pytest.param(lambda: SelectorBudget(threshold=0.0), ValueError, r"must lie in \(0, 1\), got 0.0",
                 id="selector-threshold-zero"),
    pytest.param(lambda: SelectorBudget(threshold=math.nan), ValueError,
                 r"SelectorBudget.threshold must be finite, got nan",
                 id="selector-threshold-nan"),
    pytest.param(lambda: SelectorBudget(threshold="0.5"), TypeError, r"SelectorBudget.threshold must be a float",
                 id="selector-threshold-str"),
    pytest.param(lambda: EarlyExitBudget(threshold=0.9, fixed_exit=2), ValueError,
                 r"exactly one of threshold and fixed_exit, got threshold, fixed_exit", id="early_exit-both"),
    pytest.param(lambda: EarlyExitBudget(threshold=math.inf), ValueError,
                 r"EarlyExitBudget.threshold must be finite, got inf",
                 id="early_exit-threshold-inf"),
    pytest.param(lambda: EarlyExitBudget(threshold=1.5, criterion="max_prob"), ValueError,
                 r"EarlyExitBudget.threshold must lie in \[0, 1\] for criterion 'max_prob', got 1.5",
                 id="early_exit-max_prob-above-one"),
    pytest.param(lambda: EarlyExitBudget(threshold=1.5), ValueError,
                 r"EarlyExitBudget.threshold must lie in \[0, 1\] for criterion 'nbest_posterior', got 1.5",
                 id="early_exit-nbest-above-one"),
    pytest.param(lambda: EarlyExitBudget(threshold=0.5, nbest=0), ValueError, r"EarlyExitBudget.nbest must be >= 1",
                 id="early_exit-nbest-zero"),
    pytest.param(lambda: EarlyExitBudget(threshold=0.5, criterion="entropy"), ValueError,
                 r"must lie in \(-inf, 0\] \(a negative entropy\) for criterion 'entropy', got 0.5",
                 id="early_exit-entropy-positive"),
    pytest.param(lambda: EarlyExitBudget(threshold=0.5, criterion="nbest"), ValueError,
                 r"EarlyExitBudget.criterion must be one of \('nbest_posterior', 'entropy', 'max_prob'\), got 'nbest'",
                 id="early_exit-unknown-criterion"),
    pytest.param(lambda: EarlyExitBudget(fixed_exit=0), ValueError, r"EarlyExitBudget.fixed_exit must be >= 1, got 0",
                 id="early_exit-fixed-zero"),
    pytest.param(lambda: EarlyExitBudget(fixed_exit=2.0), TypeError, r"EarlyExitBudget.fixed_exit must be an int",
                 id="early_exit-fixed-float"),
    pytest.param(lambda: BlankSkipBudget(0.0), ValueError, r"BlankSkipBudget.threshold must lie in \(0, 1\], got 0.0",
                 id="blank_skip-threshold-zero"),
    pytest.param(lambda: BlankSkipBudget(1.5), ValueError, r"BlankSkipBudget.threshold must lie in \(0, 1\], got 1.5",
                 id="blank_skip-threshold-above-one"),
    pytest.param(lambda: BlankSkipBudget(math.nan), ValueError, r"BlankSkipBudget.threshold must be finite",
                 id="blank_skip-threshold-nan"),
    pytest.param(lambda: BlankSkipBudget(None), TypeError, r"BlankSkipBudget.threshold must be a float, got None",
                 id="blank_skip-threshold-none"),
    pytest.param(lambda: BlankSkipBudget(0.9, spike_window=-1), ValueError,
                 r"BlankSkipBudget.spike_window must be >= 0, got -1", id="blank_skip-negative-window"),
    pytest.param(lambda: BlankSkipBudget(0.9, spike_window=1.5), TypeError,
                 r"BlankSkipBudget.spike_window must be an int, got 1.5", id="blank_skip-float-window"),
]


@pytest.mark.parametrize("make, error, message", BAD_BUDGETS)
def test_bad_budget_fields_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


MODEL_MISMATCHES = [
    pytest.param(dict(), LayerDropBudget(5), r"LayerDropBudget.layers must lie in \[0, 4\], got 5",
                 id="layer_drop-more-layers-than-the-model"),
    pytest.param(dict(selector_hidden=8), SelectorBudget(k=5), r"SelectorBudget.k must lie in \[0, 4\], got 5",
                 id="selector-k-above-depth"),
    pytest.param(dict(exit_depths=(2,)), EarlyExitBudget(fixed_exit=3),
                 r"EarlyExitBudget.fixed_exit must be one of the model's exit depths \[2, 4\], got 3",
                 id="early_exit-no-head-at-fixed-exit"),
    pytest.param(dict(), EarlyExitBudget(threshold=0.9), r"needs a model with early-exit heads",
                 id="early_exit-model-without-exit-heads"),
    pytest.param(dict(), SelectorBudget(threshold=0.5), r"needs a model with a layer selector",
                 id="selector-model-without-selector"),
    pytest.param(dict(), BlankSkipBudget(0.9), r"needs a model with an intermediate blank head",
                 id="blank_skip-model-without-blank-head"),
]


@pytest.mark.parametrize("model_fields, budget, message", MODEL_MISMATCHES)
def test_budget_the_model_cannot_run_is_refused(model_fields, budget, message):
    model = tiny_model(**model_fields)
    features, lengths, _, _ = toy_batch(0, batch_size=2)
    with pytest.raises(ValueError, match=message):
        infer(model, features, lengths, budget)


@pytest.mark.parametrize("budget", [
    pytest.param(FullBudget(), id="full"),
    pytest.param(LayerDropBudget(0, "first"), id="layer_drop-zero-layers"),
    pytest.param(LayerDropBudget(4, "random"), id="layer_drop-every-layer"),
    pytest.param(EarlyExitBudget(threshold=0.0), id="early_exit-max_prob-zero"),
    pytest.param(EarlyExitBudget(threshold=-0.1, criterion="entropy"), id="early_exit-entropy"),
    pytest.param(EarlyExitBudget(fixed_exit=4), id="early_exit-last-layer"),
    pytest.param(BlankSkipBudget(1.0, spike_window=0), id="blank_skip-threshold-one"),
    pytest.param(SelectorBudget(k=0), id="selector-k-zero"),
])
def test_valid_budgets_run(budget):
    model = tiny_model(exit_depths=(2,), blank_skip_depth=2, selector_hidden=8)
    features, lengths, _, _ = toy_batch(0, batch_size=3)
    result = infer(model, features, lengths, budget)
    assert 0 <= result.report.executed_fraction <= 1
    assert result.log_probs.shape[:2] == (3, int(result.lengths.max()))
