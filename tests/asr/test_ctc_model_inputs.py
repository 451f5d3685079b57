"""Feature lengths are checked in the caller's units; a too-short utterance has no output frame."""
import pytest
import torch

from dynenc import methods
from dynenc.asr import CTCModel, ModelConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CTCModel(ModelConfig(vocab_size=10, num_features=16, dim=16, num_heads=2, ffn_dim=32, num_layers=2)).eval()


@pytest.mark.parametrize("lengths,error,match", [
    pytest.param([40, -3], ValueError, r"lengths must lie in \[0, T=40\], got min -3 max 40", id="negative"),
    pytest.param([50, 30], ValueError, r"lengths must lie in \[0, T=40\], got min 30 max 50", id="above_T"),
    pytest.param([40.0, 30.0], ValueError, "lengths must be an integer tensor", id="float"),
    pytest.param([40], ValueError, r"lengths must be an integer tensor of shape \(2,\)", id="wrong_batch"),
])
def test_bad_feature_lengths(model, lengths, error, match):
    with pytest.raises(error, match=match):
        methods.infer(model, torch.randn(2, 40, 16), torch.tensor(lengths), methods.FullBudget())


def test_a_too_short_utterance_has_no_output_frame(model):
    features = torch.randn(2, 40, 16)
    result = methods.infer(model, features, torch.tensor([40, 5]), methods.FullBudget())
    alone = methods.infer(model, features[:1], torch.tensor([40]), methods.FullBudget())
    assert result.lengths.tolist() == [9, 0]
    torch.testing.assert_close(result.log_probs[0], alone.log_probs[0])
