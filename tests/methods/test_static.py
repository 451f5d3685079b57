"""The static objective: plain CTC, or InterCTC when the model has intermediate heads."""
import pytest
import torch
import torch.nn.functional as F

from dynenc import methods
from dynenc.asr import ctc_loss
from toy_ctc import tiny_model, toy_batch


def _ctc_of_layer(model, batch, layer):
    """CTC of ``model.exit_head(layer)`` on layer ``layer``'s hidden states, by hand."""
    features, lengths, targets, target_lengths = batch
    x, x_lengths = model.embed(features, lengths)
    out = model.encoder(x, x_lengths, return_hidden=True)
    hidden = out.packed.unpack(out.hidden[layer - 1])
    return ctc_loss(F.log_softmax(model.exit_head(layer)(hidden), dim=-1), x_lengths, targets, target_lengths)


@pytest.mark.parametrize("exits", [(2,), (1, 3)], ids=["one_head", "two_heads"])
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5], ids=lambda w: f"w={w}")
def test_inter_ctc_mixes_last_and_intermediate_losses(weight, exits):
    model = tiny_model(seed=2, exit_depths=exits).eval()
    batch = toy_batch(7)
    features, lengths, targets, target_lengths = batch
    log_probs, out_lengths, _ = model(features, lengths)  # the model's own (inference) output
    final = ctc_loss(log_probs, out_lengths, targets, target_lengths)
    inter = sum(_ctc_of_layer(model, batch, layer) for layer in exits) / len(exits)  # the mean, not the sum
    loss, logs = methods.StaticCTC(weight)(model, batch)
    torch.testing.assert_close(loss, (1 - weight) * final + weight * inter)
    assert logs["ctc"] == pytest.approx(final.item(), rel=1e-5) and {f"ctc{layer}" for layer in exits} <= set(logs)


@pytest.mark.parametrize("exits", [(), (4,)], ids=["no_heads", "only_the_last_layer"])
def test_without_intermediate_heads_it_is_plain_ctc(exits):
    model = tiny_model(seed=2, exit_depths=exits).eval()
    batch = toy_batch(7)
    features, lengths, targets, target_lengths = batch
    log_probs, out_lengths, _ = model(features, lengths)
    loss, logs = methods.StaticCTC(0.3)(model, batch)
    torch.testing.assert_close(loss, ctc_loss(log_probs, out_lengths, targets, target_lengths))
    assert set(logs) == {"ctc"}


def test_the_intermediate_head_gets_gradient_only_with_a_weight():
    for weight, trained in ((0.3, True), (0.0, False)):
        model = tiny_model(seed=2, exit_depths=(2,)).train()
        methods.StaticCTC(weight)(model, toy_batch(3))[0].backward()
        grads = [p.grad for p in model.exit_head(2).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == trained, weight


@pytest.mark.parametrize("weight, error", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                           ("0.3", TypeError)], ids=["one", "negative", "above_one", "string"])
def test_rejects_weights(weight, error):
    with pytest.raises(error, match="inter_ctc_weight"):
        methods.StaticCTC(weight)
