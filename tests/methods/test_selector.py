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
    mask = methods.topk_mask(model.selector(x, x_lengths, 2), 2)
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
    expected = torch.sigmoid(model.selector(x, x_lengths, model.config.num_layers)) > 0.5
    result = infer(model, features, lengths, SelectorBudget(threshold=0.5))
    assert torch.equal(result.decisions.layer_mask, expected)
    assert torch.equal(result.report.sample_depth, expected.sum(1))
    targeted = infer(model, features, lengths, SelectorBudget(threshold=0.5, target=1))
    assert torch.equal(targeted.decisions.layer_mask, torch.sigmoid(model.selector(x, x_lengths, 1)) > 0.5)


@torch.no_grad()
def test_the_selector_sees_the_budget():
    """One selector serves every k: its scores depend on k."""
    model = tiny_model(selector_hidden=16).eval()
    x, x_lengths = model.embed(*toy_batch(1)[:2])
    scores = [model.selector(x, x_lengths, k) for k in (1, 2, 4)]
    assert not torch.allclose(scores[0], scores[1]) and not torch.allclose(scores[1], scores[2])
    per_sample = model.selector(x, x_lengths, torch.tensor([1, 2, 4, 1, 2, 4]))
    torch.testing.assert_close(per_sample[0], scores[0][0])
    torch.testing.assert_close(per_sample[2], scores[2][2])


def test_relaxed_topk_is_a_k_hot_relaxation():
    scores = torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 5.0, 4.0, 1.0]])
    for k in (0, 1, 2, 3):
        soft = methods.relaxed_topk(scores, k, temperature=1.0)
        torch.testing.assert_close(soft.sum(1), torch.full((2,), float(k)))
        hard = methods.relaxed_topk(scores, k, temperature=0.01)
        torch.testing.assert_close(hard, methods.topk_mask(scores, k).float(), atol=1e-3, rtol=0)


def test_straight_through_path_alone_trains_the_selector():
    """With the budget regulariser off, gradients reach the selector only through the
    straight-through gates of the executed layers — and do."""
    model = tiny_model(selector_hidden=16).train()
    torch.manual_seed(0)
    loss, _ = methods.SelectorObjective(min_layers=2, regulariser_weight=0.0)(model, toy_batch(6))
    loss.backward()
    grads = [p.grad for p in model.selector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_selector_learns_an_input_dependent_choice_that_beats_any_fixed_subset():
    """A toy where the useful layer depends on the input: input class c gains r[c, l] from
    running layer l (the local effect of a gate in x + g (F(x) - x) is linear in g). Trained
    with the same estimator and budget k = 1, the selector picks each class's best layer; any
    fixed layer loses."""
    torch.manual_seed(0)
    num_layers, classes = 4, 4
    reward = torch.eye(classes)[torch.tensor([2, 0, 3, 1])] + 0.1 * torch.rand(classes, num_layers)
    selector = torch.nn.Sequential(torch.nn.Linear(classes, 16), torch.nn.ReLU(), torch.nn.Linear(16, num_layers))
    optimizer = torch.optim.Adam(selector.parameters(), lr=0.05)
    for _ in range(150):
        c = torch.randint(0, classes, (32,))
        _, gates = methods.straight_through_topk(selector(F.one_hot(c, classes).float()), 1, temperature=0.5)
        loss = -(gates * reward[c]).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    chosen = methods.topk_mask(selector(torch.eye(classes)), 1).float()
    learned = (chosen * reward).sum(1).mean()
    best_fixed = reward.mean(0).max()
    assert torch.equal(chosen.argmax(1), reward.argmax(1))
    assert learned > best_fixed + 0.5


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
