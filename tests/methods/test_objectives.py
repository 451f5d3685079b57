"""Every method's training objective learns a toy sequence task."""
import pytest
import torch

from dynenc import methods
from toy_ctc import tiny_model, toy_batch

OBJECTIVES = {
    "static": (dict(), lambda m: methods.StaticCTC()),
    "static_inter_ctc": (dict(exit_depths=(2,)), lambda m: methods.StaticCTC(0.3)),
    "layer_drop": (dict(), lambda m: methods.LayerDropCTC(4, 0.3)),
    "dld_self": (dict(), lambda m: methods.DLDObjective("self", weight=1.0, temperature=2.0, drop_prob=0.3,
                                                        hidden_weight=0.1)),
    "selector": (dict(selector_hidden=16), lambda m: methods.SelectorObjective(min_layers=2)),
    "early_exit": (dict(exit_depths=(2,)), lambda m: methods.EarlyExitObjective({2: 0.5})),
    "blank_skip": (dict(blank_skip_depth=2, factorized_ctc=True), lambda m: methods.BlankSkipObjective()),
}


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in sorted(OBJECTIVES)])
def test_toy_learnability(name):
    overrides, make = OBJECTIVES[name]
    model = tiny_model(seed=1, **overrides).train()
    objective = make(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [toy_batch(100 + i, batch_size=8) for i in range(4)]
    torch.manual_seed(0)
    losses = []
    for step in range(40):
        loss, logs = objective(model, batches[step % 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, (name, losses)
