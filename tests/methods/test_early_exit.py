"""Early exits: decisions equal per-sample decisions, posteriors come from the exit head,
and the decisions come back in the output objects (the policy keeps no state)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dynenc import methods
from dynenc.methods import EarlyExitBudget, EarlyExitPolicy, FullBudget, infer
from dynenc.methods.early_exit import nbest_posterior
from toy_ctc import run_layer_alone, tiny_model, toy_batch


def utterance_confidence(log_probs, criterion):
    """Oracle: the confidence of one utterance's posteriors ``[T, V]`` alone."""
    if criterion == "nbest_posterior":
        return nbest_posterior(log_probs[None], torch.tensor([log_probs.shape[0]]), nbest=16)[0]
    return methods.frame_confidence(log_probs, criterion).mean()


@pytest.mark.parametrize("criterion", [pytest.param(c, id=c) for c in methods.early_exit.CRITERIA])
@torch.no_grad()
def test_early_exit_matches_per_sample_decisions(criterion):
    model = tiny_model(exit_depths=(1, 2, 3)).eval()
    features, lengths, _, _ = toy_batch(2)
    x, x_lengths = model.embed(features, lengths)
    # Per-sample confidences at each exit (the oracle runs every layer; fine for the check).
    confidences = []
    for b, length in enumerate(x_lengths.tolist()):
        h = x[b:b + 1, :length]
        row = []
        for layer_id in range(3):
            h = run_layer_alone(model, layer_id, h)
            row.append(utterance_confidence(F.log_softmax(model.exit_head(layer_id + 1)(h[0]), -1), criterion))
        confidences.append(torch.stack(row))
    confidences = torch.stack(confidences)
    ordered = confidences.flatten().sort().values
    middle = ordered.numel() // 2
    threshold = ((ordered[middle - 1] + ordered[middle]) / 2).item()  # away from ties
    passes = confidences >= threshold
    expected_exit = torch.where(passes.any(1), passes.float().argmax(1) + 1, torch.tensor(4))
    result = infer(model, features, lengths, EarlyExitBudget(threshold=threshold, criterion=criterion))
    assert torch.equal(result.decisions.exit_depth, expected_exit)
    assert torch.equal(result.report.sample_depth, expected_exit)
    assert result.report.tokens_per_layer == [int((x_lengths * (expected_exit > l)).sum()) for l in range(4)]
    for b, length in enumerate(x_lengths.tolist()):
        exit_at = int(expected_exit[b])
        h = x[b:b + 1, :length]
        for layer_id in range(exit_at):
            h = run_layer_alone(model, layer_id, h)
        torch.testing.assert_close(result.log_probs[b, :length], F.log_softmax(model.exit_head(exit_at)(h[0]), -1),
                                   atol=1e-5, rtol=1e-5)
    fixed = infer(model, features, lengths, EarlyExitBudget(fixed_exit=2))
    assert (fixed.decisions.exit_depth == 2).all() and fixed.report.tokens_per_layer[2:] == [0, 0]


@torch.no_grad()
def test_exit_decisions_come_back_in_the_encoder_output():
    model = tiny_model(exit_depths=(1, 2, 3)).eval()
    features, lengths, _, _ = toy_batch(2)
    x, x_lengths = model.embed(features, lengths)
    policy = EarlyExitPolicy(model, EarlyExitBudget(fixed_exit=2))
    everything = torch.ones(x.shape[0], 4, dtype=torch.bool)
    runs = [model.encode(x, x_lengths, layer_mask=everything, policy=policy)[2] for _ in range(2)]
    for out in runs:  # the same policy twice: no state carried between forwards
        assert list(out.decisions) == [1]
        decision = out.decisions[1]
        assert decision.exits.all() and decision.log_probs.shape == (int(x_lengths.sum()), model.config.vocab_size)
        assert out.report.tokens_per_layer[2:] == [0, 0]
    torch.testing.assert_close(runs[0].decisions[1].log_probs, runs[1].decisions[1].log_probs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.budget = EarlyExitBudget(fixed_exit=3)
    assert policy.decision_layers == (1,)
    assert EarlyExitPolicy(model, EarlyExitBudget(threshold=0.5)).decision_layers == (0, 1, 2)


@torch.no_grad()
def test_exit_at_the_last_layer_is_the_full_model():
    model = tiny_model(exit_depths=(2,)).eval()
    features, lengths, _, _ = toy_batch(2)
    full = infer(model, features, lengths, methods.FullBudget())
    last = infer(model, features, lengths, EarlyExitBudget(fixed_exit=4))
    assert (last.decisions.exit_depth == 4).all()
    torch.testing.assert_close(last.log_probs, full.log_probs)
    assert last.report.executed_fraction == 1.0


def test_nbest_posterior_is_a_softmax_over_the_decoders_scores():
    """The authors' criterion: the 1-best's posterior among torchaudio's N-best hypotheses."""
    from torchaudio.models.decoder import ctc_decoder

    gen = torch.Generator().manual_seed(0)
    log_probs = torch.randn(2, 12, 6, generator=gen).log_softmax(-1)
    lengths = torch.tensor([12, 7])
    decoder = ctc_decoder(lexicon=None, tokens=["-", "a", "b", "c", "d", "e"], lm=None, nbest=4, beam_size=4,
                          blank_token="-", sil_token="-")
    for b, hypotheses in enumerate(decoder(log_probs, lengths.to(torch.int32))):
        scores = torch.tensor([h.score for h in hypotheses], dtype=torch.float64)
        expected = (scores[0] - torch.logsumexp(scores, 0)).exp().item()
        assert nbest_posterior(log_probs[b:b + 1], lengths[b:b + 1], nbest=4).item() == pytest.approx(expected, rel=1e-5)
    assert ((nbest_posterior(log_probs, lengths, nbest=4) > 0) & (nbest_posterior(log_probs, lengths, 4) <= 1)).all()


def test_entropy_is_normalised_by_frames_and_units():
    log_probs = torch.randn(9, 7).log_softmax(-1)
    expected = (log_probs.exp() * log_probs).sum() / (9 * 7)
    torch.testing.assert_close(methods.frame_confidence(log_probs, "entropy").mean(), expected)


@torch.no_grad()
def test_no_overhead_while_nobody_exits(monkeypatch):
    """A threshold nobody reaches runs the layers exactly like full depth (prefix routes: no
    gather or scatter), and the exit heads see only rows still running."""
    model = tiny_model(exit_depths=(1, 2, 3)).eval()
    features, lengths, _, _ = toy_batch(2)
    calls = []
    for name in ("gather_rows", "gated_residual_scatter"):
        original = getattr(methods.early_exit.ops, name)
        monkeypatch.setattr(methods.early_exit.ops, name,
                            lambda *a, original=original, name=name: calls.append(name) or original(*a))
    infer(model, features, lengths, FullBudget())
    full_calls, calls[:] = list(calls), []
    result = infer(model, features, lengths, EarlyExitBudget(threshold=1.0, criterion="max_prob"))
    assert (result.decisions.exit_depth == 4).all() and calls == full_calls
    head_rows = []
    model.exit_head(2).register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[0]))
    result = infer(model, features, lengths, EarlyExitBudget(threshold=0.0, criterion="max_prob"))
    assert (result.decisions.exit_depth == 1).all() and head_rows == [0]  # everyone left at layer 1
