"""Random layer dropping: training masks, fixed-n inference masks, the budget against a
per-sample oracle, determinism, gradients of skipped layers and the gating option."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from dynenc import methods
from dynenc.methods import LayerDropBudget, get_method, infer
from dynenc.asr import train as train_module
from toy_ctc import per_sample_oracle, run_layer_alone, tiny_model, toy_batch


def test_random_layer_drop_masks():
    drop = methods.RandomLayerDrop(8, p=0.5)
    gen = torch.Generator().manual_seed(0)
    mask = drop.sample(1000, torch.device("cpu"), gen)
    assert mask.shape == (1000, 8) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.5) < 0.03
    assert torch.equal(mask, drop.sample(1000, torch.device("cpu"), torch.Generator().manual_seed(0)))
    batch_mask = methods.RandomLayerDrop(8, p=0.5, gating="per_batch").sample(5, torch.device("cpu"), gen)
    assert (batch_mask == batch_mask[0]).all()
    assert methods.RandomLayerDrop(3, p=0.0).sample(4, torch.device("cpu")).all()
    assert not methods.RandomLayerDrop(3, p=1.0).sample(4, torch.device("cpu")).any()
    schedule = methods.linear_drop_schedule(4, 0.8)
    assert torch.allclose(schedule, torch.tensor([0.2, 0.4, 0.6, 0.8]))
    with pytest.raises(ValueError, match="one per layer"):
        methods.RandomLayerDrop(3, p=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        methods.RandomLayerDrop(3, p=1.5)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        methods.RandomLayerDrop(3, p=float("nan"))  # NaN would drop every layer


@pytest.mark.parametrize("strategy", [pytest.param(s, id=s) for s in ("every_other", "first", "random")])
@pytest.mark.parametrize("n", [pytest.param(n, id=f"n={n}") for n in (0, 1, 3, 4, 6)])
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


@torch.no_grad()
def test_layer_drop_budget_report_and_oracle():
    model = tiny_model().eval()
    features, lengths, _, _ = toy_batch(0)
    result = infer(model, features, lengths, LayerDropBudget(layers=2))
    x, x_lengths = model.embed(features, lengths)
    assert result.report.tokens_per_layer == [0, int(x_lengths.sum()), 0, int(x_lengths.sum())]
    assert result.report.executed_fraction == pytest.approx(0.5)
    assert (result.report.sample_depth == 2).all()
    assert torch.equal(result.decisions.layer_mask, methods.fixed_layers_mask(4, 2, features.shape[0]))
    expected = per_sample_oracle(model, x, x_lengths,
                                 lambda b, l, h: run_layer_alone(model, l, h) if l in (1, 3) else h)
    for b, length in enumerate(x_lengths.tolist()):
        torch.testing.assert_close(result.log_probs[b, :length], F.log_softmax(model.ctc_head(expected[b][0]), -1),
                                   atol=1e-5, rtol=1e-5)


def test_determinism_under_fixed_seed():
    results = []
    for _ in range(2):
        model = tiny_model(seed=5).train()
        torch.manual_seed(11)
        loss, _ = methods.LayerDropCTC(4, 0.5)(model, toy_batch(4))
        results.append(loss.item())
    assert results[0] == results[1]


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


def parse_train_flags(*argv):
    parser = argparse.ArgumentParser(prog="dynenc train")
    train_module.add_arguments(parser)
    return train_module.config_from_args(parser.parse_args(["--data", "unused", *argv]))


def training_masks(method, gating):
    """The layer masks one training step of ``method`` (``dynenc train --gating``) runs."""
    config = parse_train_flags("--method", method, "--gating", gating, "--drop-prob", "0.5")
    model = tiny_model().train()
    masks = []
    model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("layer_mask")), with_kwargs=True)
    torch.manual_seed(3)
    get_method(method).objective(config, model)(model, toy_batch(0))
    return [mask for mask in masks if mask is not None]  # DLD's teacher pass runs every layer


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in ("layer_drop", "dld")])
def test_per_batch_gating_gives_every_sample_the_same_layers(method):
    [mask] = training_masks(method, "per_batch")
    assert (mask == mask[0]).all()


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in ("layer_drop", "dld")])
def test_per_sample_gating_draws_each_sample_its_own_layers(method):
    [mask] = training_masks(method, "per_sample")
    assert not (mask == mask[0]).all()


@pytest.mark.parametrize("make, field", [
    pytest.param(lambda: train_module.TrainConfig(gating="per_frame"), "TrainConfig.gating", id="train-config"),
    pytest.param(lambda: methods.LayerDropCTC(4, gating="per_frame"), "RandomLayerDrop.gating", id="layer-drop"),
    pytest.param(lambda: methods.DLDObjective(gating="per_frame"), "DLDObjective.gating", id="dld"),
])
def test_bad_gating_is_refused(make, field):
    with pytest.raises(ValueError, match=rf"{field} must be one of \('per_sample', 'per_batch'\), got 'per_frame'"):
        make()


def test_a_bad_gating_flag_is_refused_with_its_choices(capsys):
    with pytest.raises(SystemExit):
        parse_train_flags("--gating", "per_frame")
    assert "invalid choice: 'per_frame' (choose from 'per_sample', 'per_batch')" in capsys.readouterr().err
