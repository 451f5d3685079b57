"""Speech foundation models on the routing engine: wav2vec2, HuBERT and WavLM from torchaudio
(:func:`from_torchaudio`) and Hugging Face (:func:`from_huggingface`), with their submodule
names, their calls and dynenc's per-sample / per-frame depth (docs/foundation.md)."""

from __future__ import annotations

from torch import nn

from .encoder import DynamicTransformer
from .layer import DynamicTransformerLayer, RelativePositionBias
from .torchaudio_model import DynamicWav2Vec2Model

__all__ = [
    "DynamicTransformer",
    "DynamicTransformerLayer",
    "DynamicWav2Vec2Model",
    "RelativePositionBias",
    "from_huggingface",
    "from_torchaudio",
]


def from_torchaudio(model: nn.Module) -> nn.Module:
    """A dynamic copy of a torchaudio model: a ``Conformer`` gives a
    :class:`~dynenc.DynamicConformer` (as :meth:`DynamicConformer.from_torchaudio`), a
    ``Wav2Vec2Model`` from any of torchaudio's wav2vec2 / HuBERT / WavLM factories a
    :class:`DynamicWav2Vec2Model`. Same submodule and parameter names; a model it cannot
    represent raises ``ValueError`` naming the first difference."""
    import torchaudio

    from ..model import DynamicConformer

    if isinstance(model, torchaudio.models.Wav2Vec2Model):
        return DynamicWav2Vec2Model.from_torchaudio(model)
    if isinstance(model, nn.Module) and hasattr(model, "conformer_layers"):
        return DynamicConformer.from_torchaudio(model)
    raise TypeError(
        f"model must be a torchaudio.models.Conformer or torchaudio.models.Wav2Vec2Model, got {type(model).__name__}"
    )


def from_huggingface(model: nn.Module) -> nn.Module:
    """A dynamic copy of a Hugging Face ``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel`` or
    ``*ForCTC`` (``pip install dynenc[hf]``): HF's state-dict keys and call, plus dynenc's
    routing keywords. See :func:`dynenc.foundation.huggingface.from_huggingface`."""
    from .huggingface import from_huggingface as convert

    return convert(model)
