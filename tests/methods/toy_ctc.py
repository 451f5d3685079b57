"""Tiny CTC models, a learnable toy task and per-sample oracles shared by the method tests."""
import torch

from dynenc.asr import CTCModel, ModelConfig

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
