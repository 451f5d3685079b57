"""CTC-blank frame skipping: equality with a compacted per-sample oracle, skipped frames
emit blank, and the skip decision comes back in the output objects."""
import pytest
import torch
import torch.nn.functional as F

from dynenc.methods import BlankSkipBudget, BlankSkipPolicy, infer
from toy_ctc import VOCAB, run_layer_alone, tiny_model, toy_batch


@pytest.mark.parametrize("factorized", [pytest.param(False, id="softmax_head"),
                                        pytest.param(True, id="factorized_head")])
@torch.no_grad()
def test_blank_skip_matches_compacted_per_sample_oracle(factorized):
    model = tiny_model(blank_skip_depth=2, factorized_ctc=factorized).eval()
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
    result = infer(model, features, lengths, BlankSkipBudget(threshold=threshold, spike_window=window))
    skipped_total = 0
    for b, length in enumerate(x_lengths.tolist()):
        h = lower[b]
        nonblank = model.blank_head.blank_log_prob(h[0]).exp() <= threshold
        keep = F.max_pool1d(nonblank.float()[None, None], 2 * window + 1, 1, window)[0, 0] > 0
        assert torch.equal(result.decisions.skipped_frames[b, :length], ~keep)
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


@torch.no_grad()
def test_skip_decision_comes_back_in_the_encoder_output():
    model = tiny_model(blank_skip_depth=2, factorized_ctc=True).eval()
    torch.nn.init.normal_(model.blank_head.blank.weight, std=1.0)
    features, lengths, _, _ = toy_batch(3)
    x, x_lengths = model.embed(features, lengths)
    policy = BlankSkipPolicy(model.blank_head, 2, BlankSkipBudget(threshold=0.5, spike_window=0))
    first, second = (model.encode(x, x_lengths, policy=policy)[2] for _ in range(2))
    assert list(first.decisions) == [1] and first.decisions[1].dtype == torch.bool
    assert torch.equal(first.decisions[1], second.decisions[1]), "no state carried between forwards"
    skipped = int(first.decisions[1].sum())
    assert first.report.tokens_per_layer[2] == int(x_lengths.sum()) - skipped
    result = infer(model, features, lengths, BlankSkipBudget(threshold=0.5, spike_window=0))
    assert int(result.decisions.skipped_frames.sum()) == skipped
