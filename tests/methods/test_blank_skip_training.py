"""Blank skipping trained as it runs: the training forward with skipping active is the
inference computation, the final head works only on frames that ran every layer, a
factorized final head, and KD against a teacher that rules units out."""
import torch

from dynenc import methods
from dynenc.asr import ctc_loss, distillation_kl
from dynenc.methods import BlankSkipBudget, infer
from dynenc.methods.blank_skip import BlankSkipObjective
from toy_ctc import tiny_model, toy_batch


def _model(**overrides):
    return tiny_model(blank_skip_depth=2, factorized_ctc=True, **overrides).eval()


@torch.no_grad()
def _median_blank_probability(model, features, lengths):
    """A threshold that skips about half the frames."""
    x, x_lengths = model.embed(features, lengths)
    out = model.encoder(x, x_lengths, return_hidden=True)
    return model.blank_head.blank_log_prob(out.hidden[1]).exp().median().item()


@torch.no_grad()
def test_training_with_skipping_active_is_the_inference_computation():
    model = _model()
    batch = toy_batch(3)
    features, lengths, targets, target_lengths = batch
    tau = _median_blank_probability(model, features, lengths)
    _, logs = BlankSkipObjective(skip_threshold=tau, spike_window=0)(model, batch)
    result = infer(model, features, lengths, BlankSkipBudget(tau, spike_window=0))
    x_lengths = result.lengths
    assert 0 < logs["skipped"] < 1
    assert logs["ctc"] == ctc_loss(result.log_probs, x_lengths, targets, target_lengths).item()
    _, plain = BlankSkipObjective()(model, batch)
    assert "skipped" not in plain and plain["ctc"] != logs["ctc"]


@torch.no_grad()
def test_final_head_runs_only_on_frames_that_ran_every_layer():
    model = _model()
    features, lengths = toy_batch(3)[:2]
    rows = []
    model.ctc_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    result = infer(model, features, lengths,
                   BlankSkipBudget(_median_blank_probability(model, features, lengths), spike_window=0))
    skipped = result.decisions.skipped_frames
    assert skipped.any()
    assert rows == [int(result.lengths.sum()) - int(skipped.sum())]
    blank_only = result.log_probs[skipped]
    assert (blank_only[:, 0] == 0).all() and torch.isinf(blank_only[:, 1:]).all()


def test_skipping_training_gives_finite_gradients_to_every_head():
    model = _model().train()
    batch = toy_batch(4)
    tau = _median_blank_probability(model, *batch[:2])
    loss, logs = BlankSkipObjective(skip_threshold=tau, spike_window=1)(model, batch)
    assert logs["skipped"] > 0
    loss.backward()
    for head in (model.ctc_head, model.blank_head):
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@torch.no_grad()
def test_factorized_final_head():
    model = _model(factorized_final_ctc=True)
    assert isinstance(model.ctc_head, methods.blank_skip.CTCHead)
    features, lengths = toy_batch(3)[:2]
    log_probs = infer(model, features, lengths, methods.FullBudget()).log_probs
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]))


def test_kd_against_a_teacher_that_rules_units_out_is_finite():
    teacher = torch.tensor([[[0.0, float("-inf"), float("-inf")]]])
    student = torch.log_softmax(torch.randn(1, 1, 3, requires_grad=True), -1)
    kl = distillation_kl(teacher, student, torch.tensor([1]))
    kl.backward()
    torch.testing.assert_close(kl, -student[0, 0, 0].detach())
