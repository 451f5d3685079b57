"""The dynamic-depth methods: budgets, executed work, equality with per-sample oracles,
gradients and toy learnability."""
import pytest
import torch
import torch.nn.functional as F

from dynenc import methods
from dynenc.asr import CTCModel, ModelConfig
from dynenc.methods import Budget, infer

VOCAB = 6
FEATURES = 16


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, num_features=FEATURES, dim=32, num_heads=4, ffn_dim=64, num_layers=4,
                  kernel_size=5, dropout=0.0)
    config.update(overrides)
    return CTCModel(ModelConfig(**config))


def toy_batch(seed, batch_size=6, frames_per_token=8):
    """A learnable sequence task: each token is `frames_per_token` frames around its own mean."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(VOCAB, FEATURES, generator=torch.Generator().manual_seed(123)) * 2
    targets, feats = [], []
    for _ in range(batch_size):
        tokens = torch.randint(1, VOCAB, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen)
        targets.append(tokens)
        frames = means[tokens].repeat_interleave(frames_per_token, 0)
        feats.append(frames + 0.3 * torch.randn(frames.shape, generator=gen))
    lengths = torch.tensor([f.shape[0] for f in feats])
    features = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    return features, lengths, torch.cat(targets), torch.tensor([t.numel() for t in targets])


# ----------------------------------------------------------------------------- layer dropping
def test_random_layer_drop_masks():
    drop = methods.RandomLayerDrop(8, p=0.5)
    gen = torch.Generator().manual_seed(0)
    mask = drop.sample(1000, torch.device("cpu"), gen)
    assert mask.shape == (1000, 8) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.5) < 0.03
    assert torch.equal(mask, drop.sample(1000, torch.device("cpu"), torch.Generator().manual_seed(0)))
    batch_mask = methods.RandomLayerDrop(8, p=0.5, per_sample=False).sample(5, torch.device("cpu"), gen)
    assert (batch_mask == batch_mask[0]).all()
    assert methods.RandomLayerDrop(3, p=0.0).sample(4, torch.device("cpu")).all()
    assert not methods.RandomLayerDrop(3, p=1.0).sample(4, torch.device("cpu")).any()
    schedule = methods.linear_drop_schedule(4, 0.8)
    assert torch.allclose(schedule, torch.tensor([0.2, 0.4, 0.6, 0.8]))
    with pytest.raises(ValueError, match="one per layer"):
        methods.RandomLayerDrop(3, p=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        methods.RandomLayerDrop(3, p=1.5)


@pytest.mark.parametrize("strategy", ["every_other", "first", "random"])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 6])
def test_fixed_layers_mask_runs_exactly_n(strategy, n):
    mask = methods.fixed_layers_mask(6, n, 5, strategy, generator=torch.Generator().manual_seed(n))
    assert mask.shape == (5, 6) and (mask.sum(1) == n).all()


def test_every_other_keeps_alternate_layers_and_the_last():
    mask = methods.fixed_layers_mask(8, 4, 1)
    assert mask[0].nonzero().flatten().tolist() == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="strategy must be"):
        methods.fixed_layers_mask(8, 4, 1, "middle")
    with pytest.raises(ValueError, match=r"n must lie in \[0, 8\]"):
        methods.fixed_layers_mask(8, 9, 1)


# ----------------------------------------------------------------------------- budgets + oracles
def per_sample_oracle(model, x, lengths, layer_fn):
    """Each utterance alone through the encoder layers, with `layer_fn(b, layer, h)` deciding."""
    outs = []
    for b, length in enumerate(lengths.tolist()):
        h = x[b:b + 1, :length]
        for layer_id in range(model.config.num_layers):
            h = layer_fn(b, layer_id, h)
        outs.append(h)
    return outs


def run_layer_alone(model, layer_id, h):
    single = torch.tensor([h.shape[1]])
    mask = torch.zeros(1, model.config.num_layers, dtype=torch.bool)
    mask[0, layer_id] = True
    return model.encoder(h, single, layer_mask=mask)[0]


@torch.no_grad()
def test_layer_drop_budget_report_and_oracle():
    model = tiny_model().eval()
    features, lengths, _, _ = toy_batch(0)
    result = infer(model, features, lengths, Budget("layer_drop", layers=2))
    x, x_lengths = model.embed(features, lengths)
    assert result.report.tokens_per_layer == [0, int(x_lengths.sum()), 0, int(x_lengths.sum())]
    assert result.report.executed_fraction == pytest.approx(0.5)
    assert (result.report.sample_depth == 2).all()
    expected = per_sample_oracle(model, x, x_lengths,
                                 lambda b, l, h: run_layer_alone(model, l, h) if l in (1, 3) else h)
    for b, length in enumerate(x_lengths.tolist()):
        torch.testing.assert_close(result.log_probs[b, :length], F.log_softmax(model.ctc_head(expected[b][0]), -1),
                                   atol=1e-5, rtol=1e-5)


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
    result = infer(model, features, lengths, Budget("selector", layers=2))
    assert (result.report.sample_depth == 2).all()
    assert result.report.tokens_per_layer == (mask.long() * x_lengths[:, None]).sum(0).tolist()
    expected = per_sample_oracle(model, x, x_lengths, lambda b, l, h: run_layer_alone(model, l, h) if mask[b, l] else h)
    for b, length in enumerate(x_lengths.tolist()):
        torch.testing.assert_close(result.log_probs[b, :length], F.log_softmax(model.ctc_head(expected[b][0]), -1),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
@torch.no_grad()
def test_early_exit_matches_per_sample_decisions(criterion):
    model = tiny_model(exit_layers=(1, 2, 3)).eval()
    features, lengths, _, _ = toy_batch(2)
    x, x_lengths = model.embed(features, lengths)
    # Per-sample confidences at each exit (the oracle runs every layer; fine for the check).
    confidences = []
    for b, length in enumerate(x_lengths.tolist()):
        h = x[b:b + 1, :length]
        row = []
        for layer_id in range(3):
            h = run_layer_alone(model, layer_id, h)
            row.append(methods.frame_confidence(F.log_softmax(model.exit_head(layer_id + 1)(h), -1), criterion).mean())
        confidences.append(torch.stack(row))
    confidences = torch.stack(confidences)
    ordered = confidences.flatten().sort().values
    middle = ordered.numel() // 2
    threshold = ((ordered[middle - 1] + ordered[middle]) / 2).item()  # away from ties
    passes = confidences >= threshold
    expected_exit = torch.where(passes.any(1), passes.float().argmax(1) + 1, torch.tensor(4))
    result = infer(model, features, lengths, Budget("early_exit", exit_threshold=threshold, criterion=criterion))
    assert torch.equal(result.exit_layer, expected_exit)
    assert torch.equal(result.report.sample_depth, expected_exit)
    assert result.report.tokens_per_layer == [int((x_lengths * (expected_exit > l)).sum()) for l in range(4)]
    for b, length in enumerate(x_lengths.tolist()):
        exit_at = int(expected_exit[b])
        h = x[b:b + 1, :length]
        for layer_id in range(exit_at):
            h = run_layer_alone(model, layer_id, h)
        torch.testing.assert_close(result.log_probs[b, :length], F.log_softmax(model.exit_head(exit_at)(h[0]), -1),
                                   atol=1e-5, rtol=1e-5)
    fixed = infer(model, features, lengths, Budget("early_exit", fixed_exit=2))
    assert (fixed.exit_layer == 2).all() and fixed.report.tokens_per_layer[2:] == [0, 0]


@pytest.mark.parametrize("factorized", [False, True])
@torch.no_grad()
def test_blank_skip_matches_compacted_per_sample_oracle(factorized):
    model = tiny_model(blank_skip_layer=2, factorized_ctc=factorized).eval()
    features, lengths, _, _ = toy_batch(3)
    x, x_lengths = model.embed(features, lengths)
    window = 1
    head = model.blank_head.blank if factorized else model.blank_head.proj
    torch.nn.init.normal_(head.weight, std=1.0)  # p(blank) that varies across frames
    lower = []
    for b, length in enumerate(x_lengths.tolist()):
        h = x[b:b + 1, :length]
        for layer_id in range(2):
            h = run_layer_alone(model, layer_id, h)
        lower.append(h)
    p_blank = torch.cat([model.blank_head.blank_log_prob(h[0]).exp() for h in lower]).sort().values
    quarter = p_blank.numel() // 4
    threshold = ((p_blank[quarter - 1] + p_blank[quarter]) / 2).item()  # ~25 % non-blank, away from ties
    result = infer(model, features, lengths, Budget("blank_skip", blank_threshold=threshold, spike_window=window))
    skipped_total = 0
    for b, length in enumerate(x_lengths.tolist()):
        h = lower[b]
        nonblank = model.blank_head.blank_log_prob(h[0]).exp() <= threshold
        keep = F.max_pool1d(nonblank.float()[None, None], 2 * window + 1, 1, window)[0, 0] > 0
        assert torch.equal(result.skipped_frames[b, :length], ~keep)
        skipped_total += int((~keep).sum())
        kept = h[:, keep]
        for layer_id in range(2, 4):
            kept = run_layer_alone(model, layer_id, kept) if kept.shape[1] else kept
        final = h.clone()
        final[:, keep] = kept
        expected = F.log_softmax(model.ctc_head(final[0]), -1)
        expected[~keep] = F.one_hot(torch.tensor(0), VOCAB).float().log()
        torch.testing.assert_close(result.log_probs[b, :length], expected, atol=1e-5, rtol=1e-5)
    assert 0 < skipped_total < int(x_lengths.sum()), "the test needs some frames skipped and some kept"
    total = int(x_lengths.sum())
    assert result.report.tokens_per_layer == [total, total, total - skipped_total, total - skipped_total]


def test_budget_validation():
    with pytest.raises(ValueError, match="budget method must be one of"):
        Budget("magic")
    with pytest.raises(ValueError, match="needs layers"):
        Budget("layer_drop")
    with pytest.raises(ValueError, match="exactly one of exit_threshold and fixed_exit"):
        Budget("early_exit")
    with pytest.raises(ValueError, match="needs blank_threshold"):
        Budget("blank_skip")
    model = tiny_model()
    features, lengths, _, _ = toy_batch(0, batch_size=2)
    with pytest.raises(ValueError, match="layer selector"):
        infer(model, features, lengths, Budget("selector", layers=2))
    with pytest.raises(ValueError, match="blank head"):
        infer(model, features, lengths, Budget("blank_skip", blank_threshold=0.9))


def test_determinism_under_fixed_seed():
    results = []
    for _ in range(2):
        model = tiny_model(seed=5).train()
        torch.manual_seed(11)
        loss, _ = methods.LayerDropCTC(4, 0.5)(model, toy_batch(4))
        results.append(loss.item())
    assert results[0] == results[1]


# ----------------------------------------------------------------------------- gradients
def test_layer_drop_gradients_zero_exactly_where_skipped():
    model = tiny_model().train()
    features, lengths, targets, target_lengths = toy_batch(5)
    mask = torch.ones(features.shape[0], 4, dtype=torch.bool)
    mask[:, 2] = False  # no sample runs layer 2
    log_probs, out_lengths, _ = model(features, lengths, layer_mask=mask)
    F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths).backward()
    for layer_id, layer in enumerate(model.encoder.conformer_layers):
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), "every parameter stays in the graph"
        norm = sum(g.abs().sum() for g in grads)
        assert (norm == 0) if layer_id == 2 else (norm > 0)


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


# ----------------------------------------------------------------------------- learnability
OBJECTIVES = {
    "static": (dict(), lambda m: methods.StaticCTC()),
    "layer_drop": (dict(), lambda m: methods.LayerDropCTC(4, 0.3)),
    "dld_self": (dict(), lambda m: methods.DLDObjective("self", weight=1.0, temperature=2.0, drop_prob=0.3,
                                                        hidden_weight=0.1)),
    "selector": (dict(selector_hidden=16), lambda m: methods.SelectorObjective(min_layers=2)),
    "early_exit": (dict(exit_layers=(2,)), lambda m: methods.EarlyExitObjective({2: 0.5})),
    "blank_skip": (dict(blank_skip_layer=2, factorized_ctc=True), lambda m: methods.BlankSkipObjective()),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
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
