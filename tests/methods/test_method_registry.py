"""The method registry and the one inference entry point: every registered method trains
and evaluates through the table; ``infer`` never changes the model's state."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from dynenc.asr import CTCModel, ModelConfig
from dynenc import methods
from dynenc.methods import METHODS, FullBudget, LayerDropBudget, get_method, infer, method_names
from dynenc.asr.train import TrainConfig
from toy_ctc import FEATURES, VOCAB, tiny_model, toy_batch

NAMES = ("static", "layer_drop", "dld", "selector", "early_exit", "blank_skip")


def test_registry_lists_every_method_once():
    assert method_names() == NAMES
    assert all(METHODS[name].name == name and get_method(name) is METHODS[name] for name in NAMES)


def test_module_listing_is_the_registry():
    listed = subprocess.run([sys.executable, "-m", "dynenc.methods"], capture_output=True, text=True, check=True)
    assert tuple(listed.stdout.split()) == NAMES


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in NAMES])
def test_every_method_trains_and_sweeps_through_the_registry(name):
    method = get_method(name)
    base = ModelConfig(vocab_size=VOCAB, num_features=FEATURES, dim=32, num_heads=4, ffn_dim=64, num_layers=4,
                       kernel_size=5, dropout=0.0)
    torch.manual_seed(0)
    model = CTCModel(dataclasses.replace(base, **method.model_fields(base))).train()
    loss, logs = method.objective(TrainConfig(method=name, drop_prob=0.3), model)(model, toy_batch(0))
    loss.backward()
    assert torch.isfinite(loss) and logs
    features, lengths, _, _ = toy_batch(1, batch_size=3)
    masked = []
    for label, budget in method.budgets(model):
        assert isinstance(budget, tuple(m.budget_type for m in METHODS.values())), label
        result = infer(model, features, lengths, budget)
        assert 0 <= result.report.executed_fraction <= 1, label
        masked.append(result.decisions.layer_mask is not None)
    assert any(masked) == method.chooses_layers  # the recipe records layer choices by this flag


def test_method_fields_fill_only_what_the_config_leaves_unset():
    base = ModelConfig(num_layers=6)
    assert get_method("early_exit").model_fields(base) == {"exit_depths": (2, 4, 6)}
    assert get_method("early_exit").model_fields(dataclasses.replace(base, exit_depths=(3,))) == {}
    assert get_method("blank_skip").model_fields(base) == {"blank_skip_depth": 3, "factorized_ctc": True}
    assert get_method("selector").model_fields(base) == {"selector_hidden": 64}
    assert get_method("static").model_fields(base) == get_method("dld").model_fields(base) == {}


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("budget", [pytest.param(FullBudget(), id="full"),
                                    pytest.param(LayerDropBudget(2), id="layer_drop")])
def test_infer_runs_in_eval_mode_and_restores_the_callers_state(budget):
    model = tiny_model(dropout=0.3).train()
    model.frontend.eval()  # a mixed-mode model must come back mixed
    modes = {name: module.training for name, module in model.named_modules()}
    before = _state(model)
    features, lengths, _, _ = toy_batch(0)
    result = infer(model, features, lengths, budget)
    assert {name: module.training for name, module in model.named_modules()} == modes
    after = _state(model)
    assert all(torch.equal(before[name], after[name]) for name in before), "BatchNorm statistics must not move"
    assert not result.log_probs.requires_grad
    reference = infer(model.eval(), features, lengths, budget)  # eval mode: dropout off, running statistics
    torch.testing.assert_close(result.log_probs, reference.log_probs)


def test_infer_restores_the_mode_when_it_fails():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="features must be"):
        infer(model, torch.zeros(2, 30, FEATURES + 1), torch.tensor([30, 20]), FullBudget())
    assert all(module.training for module in model.modules())


def test_method_and_dld_objective_take_their_settings_by_name():
    static = get_method("static")
    with pytest.raises(TypeError):
        type(static)(static.name, static.summary, static.budget_type, static.run, static.objective, static.budgets)
    with pytest.raises(TypeError):
        methods.DLDObjective("self", 1.0, 2.0)
    assert methods.DLDObjective("self", weight=1.0, temperature=2.0).temperature == 2.0
