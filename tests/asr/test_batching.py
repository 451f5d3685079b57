"""Tests for dynenc.asr.batching: padded CTC batches and length-bucketed iteration."""
import torch

from dynenc.asr.batching import SpeechBatches, collate_batch
from dynenc.asr.tokenizer import CharTokenizer


def _fake_data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["go", "left", "stop", "don't"]
    out = []
    for i in range(n):
        t = int(torch.randint(20, 200, (1,), generator=g))
        out.append((torch.randn(t, 80, generator=g), " ".join(words[: 1 + i % 4])))
    return out


def test_collate_shapes_and_ctc_loss():
    tok = CharTokenizer()
    items = _fake_data(5)
    feats, flens, targets, tlens = collate_batch(items, tok)
    assert feats.shape == (5, max(f.shape[0] for f, _ in items), 80) and feats.dtype == torch.float32
    assert flens.dtype == tlens.dtype == targets.dtype == torch.int64
    assert flens.tolist() == [f.shape[0] for f, _ in items]
    assert tlens.tolist() == [len(t) for _, t in items]
    assert targets.shape == (int(tlens.sum()),)
    for b, (f, _) in enumerate(items):
        assert torch.equal(feats[b, : f.shape[0]], f)
        assert (feats[b, f.shape[0]:] == 0).all()
    split = torch.split(targets, tlens.tolist())
    assert [tok.decode(s) for s in split] == [t for _, t in items]
    # The batch plugs straight into ctc_loss.
    log_probs = torch.randn(feats.shape[1], 5, tok.vocab_size).log_softmax(-1)
    loss = torch.nn.functional.ctc_loss(log_probs, targets, flens, tlens, blank=tok.blank)
    assert torch.isfinite(loss)
    # Pre-tokenised targets are accepted too.
    assert torch.equal(collate_batch([(f, tok.encode(t)) for f, t in items])[2], targets)


def test_speech_batches_bucketing_and_seeding():
    data = _fake_data(23)
    tok = CharTokenizer()
    sb = SpeechBatches(data, tok, batch_size=4, shuffle=True, sort_by_length=True, seed=3, pool_batches=2)
    idx = sb.batch_indices()
    assert sorted(i for b in idx for i in b) == list(range(23))  # every item once
    assert idx == SpeechBatches(data, tok, batch_size=4, seed=3, pool_batches=2).batch_indices()
    sb.set_epoch(1)
    assert sb.batch_indices() != idx
    batches = list(sb)
    assert len(batches) == len(sb) == 6
    assert all(b[0].shape[0] == len(b[1]) for b in batches)
    # Frame budget: padded size per batch stays within max_frames.
    sb = SpeechBatches(data, tok, max_frames=600, shuffle=False)
    lens = [data[i][0].shape[0] for b in sb.batch_indices() for i in b]
    assert lens == sorted(lens)  # no shuffle + sort = global length order
    for feats, flens, _, _ in sb:
        assert feats.shape[0] * feats.shape[1] <= 600 or feats.shape[0] == 1
    # drop_last with fixed batches
    sb = SpeechBatches(data, tok, batch_size=4, shuffle=False, sort_by_length=False, drop_last=True)
    assert [len(b) for b in sb.batch_indices()] == [4] * 5
