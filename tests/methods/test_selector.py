"""Input-conditioned layer selection: top-k per sample against a per-sample oracle,
gradients through straight-through gates, soft gates."""
import torch
import torch.nn.functional as F

from dynenc import methods
from dynenc.methods import SelectorBudget, infer
from toy_ctc import per_sample_oracle, run_layer_alone, tiny_model, toy_batch


@torch.no_grad()
def test_selector_budget_obeys_k_per_sample():
    model = tiny_model(selector_hidden=16).eval()
    for param in model.selector.parameters():  # make selections differ per sample
        torch.nn.init.normal_(param, std=3.0)
    features, lengths, _, _ = toy_batch(1)
    x, x_lengths = model.embed(features, lengths)
    mask = methods.topk_mask(model.selector(x, x_lengths), 2)
    assert (mask.sum(1) == 2).all()
    assert len({tuple(row.tolist()) for row in mask}) > 1, "samples should select different layers"
    result = infer(model, features, lengths, SelectorBudget(k=2))
    assert (result.report.sample_depth == 2).all()
    assert result.report.tokens_per_layer == (mask.long() * x_lengths[:, None]).sum(0).tolist()
    assert torch.equal(result.decisions.layer_mask, mask), "the selected layers come back as decisions"
    expected = per_sample_oracle(model, x, x_lengths, lambda b, l, h: run_layer_alone(model, l, h) if mask[b, l] else h)
    for b, length in enumerate(x_lengths.tolist()):
        torch.testing.assert_close(result.log_probs[b, :length], F.log_softmax(model.ctc_head(expected[b][0]), -1),
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_selector_threshold_budget_runs_the_layers_above_it():
    model = tiny_model(selector_hidden=16).eval()
    for param in model.selector.parameters():
        torch.nn.init.normal_(param, std=3.0)
    features, lengths, _, _ = toy_batch(1)
    x, x_lengths = model.embed(features, lengths)
    expected = torch.sigmoid(model.selector(x, x_lengths)) > 0.5
    result = infer(model, features, lengths, SelectorBudget(threshold=0.5))
    assert torch.equal(result.decisions.layer_mask, expected)
    assert torch.equal(result.report.sample_depth, expected.sum(1))


def test_selector_receives_gradients_through_straight_through_gates():
    model = tiny_model(selector_hidden=16).train()
    torch.manual_seed(0)
    loss, logs = methods.SelectorObjective(min_layers=2)(model, toy_batch(6))
    loss.backward()
    grads = [p.grad for p in model.selector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert 2 <= logs["k"] <= 4


def test_soft_gates_interpolate():
    model = tiny_model().eval()
    x = torch.randn(2, 7, 32)
    lengths = torch.tensor([7, 5])
    with torch.no_grad():
        full, _ = model.encoder(x, lengths)
        half, _ = model.encoder(x, lengths, gates=torch.full((2, 4), 0.5))
        zero, _ = model.encoder(x, lengths, gates=torch.zeros(2, 4))
    valid = torch.arange(7)[None, :] < lengths[:, None]
    torch.testing.assert_close(zero[valid], x[valid])
    assert not torch.allclose(half, full) and not torch.allclose(half, zero)
