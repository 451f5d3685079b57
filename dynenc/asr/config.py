"""The CTC speech model's configuration: what a checkpoint stores beside its weights, what
``dynenc train`` / ``dynenc eval`` / ``dynenc bench`` build models from, and the only place its
defaults live.

Layer numbering, everywhere in dynenc: a *layer* is a 0-based index into the encoder's layers;
a *depth* is a number of layers run from the bottom (depth d = layers 0..d-1). Exit heads and
the blank-skip head sit at a depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple

from ..config import load_config, save_config
from ..foundation.build import ENCODERS
from ..validation import check_int, check_real

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """A CTC speech model: front-end + encoder + heads.

    Attributes:
        vocab_size: CTC output units including the blank (index 0).
        num_features: input feature bins (80-dim fbank).
        dim: the encoder's width (``torchaudio.models.Conformer``'s ``input_dim``).
        num_heads: attention heads per layer.
        ffn_dim: hidden width of the feed-forward modules.
        num_layers: encoder layers (the model's depth).
        kernel_size: the depthwise convolution's kernel (``depthwise_conv_kernel_size``; odd).
        dropout: dropout probability inside the encoder layers.
        exit_depths: depths with an early-exit CTC head (read after that many layers; the
            model's own depth is the final head). Old configs' ``exit_layers``.
        blank_skip_depth: depth K of the intermediate blank head: the first K layers run on
            every frame (0 = none). Old configs' ``blank_skip_layer``.
        factorized_ctc: the intermediate head predicts p(blank) and p(token | non-blank).
        factorized_final_ctc: the final CTC head is factorized the same way.
        selector_hidden: hidden size of the input-conditioned layer selector (0 = none).
        encoder: the encoder family: ``"conformer"`` (fbank front-end + ``DynamicConformer``)
            or a foundation model on raw 16 kHz waveforms, ``"wav2vec2"``, ``"hubert"`` or
            ``"wavlm"`` (CNN feature extractor + ``DynamicTransformer``).
        upstream: a foundation encoder's architecture: ``{"source": "torchaudio", "factory",
            "arguments"}`` or ``{"source": "huggingface", "model_type", "config"}`` (what
            ``dynenc train --init-from`` read), or empty: torchaudio's base layout at this
            config's sizes (:func:`dynenc.foundation.build.scratch_description`). Its sizes
            override ``dim`` / ``num_heads`` / ``ffn_dim`` / ``num_layers``, which record them.
        extra: free-form metadata kept with checkpoints.
    """

    #: Old configs' keys (the same numbers; the fields were named for layers, now for depths).
    renamed_fields: ClassVar[Dict[str, str]] = {"exit_layers": "exit_depths", "blank_skip_layer": "blank_skip_depth"}

    vocab_size: int = 32
    num_features: int = 80
    dim: int = 144
    num_heads: int = 4
    ffn_dim: int = 576
    num_layers: int = 8
    kernel_size: int = 15
    dropout: float = 0.1
    exit_depths: Tuple[int, ...] = ()
    blank_skip_depth: int = 0
    factorized_ctc: bool = False
    factorized_final_ctc: bool = False
    selector_hidden: int = 0
    encoder: str = "conformer"
    upstream: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"ModelConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.upstream and self.encoder == "conformer":
            raise ValueError("ModelConfig.upstream describes a foundation encoder; the conformer has none")
        self.exit_depths = tuple(self.exit_depths)
        for name in ("vocab_size", "num_features", "dim", "num_heads", "ffn_dim", "num_layers", "kernel_size"):
            check_int(f"ModelConfig.{name}", getattr(self, name), low=1)
        for name in ("blank_skip_depth", "selector_hidden"):  # 0 = none
            check_int(f"ModelConfig.{name}", getattr(self, name), low=0)
        for name in ("factorized_ctc", "factorized_final_ctc"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.vocab_size < 2:
            raise ValueError(f"ModelConfig.vocab_size must be >= 2 (blank + one unit), got {self.vocab_size}")
        if self.num_features < 7:
            raise ValueError(f"ModelConfig.num_features must be >= 7 for the 4x front-end, got {self.num_features}")
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"ModelConfig.kernel_size must be odd, got {self.kernel_size}")
        check_real("ModelConfig.dropout", self.dropout, 0.0, 1.0)
        if self.dropout == 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}")
        for depth in self.exit_depths:
            check_int("ModelConfig.exit_depths", depth, low=1, high=self.num_layers)
        if not 0 <= self.blank_skip_depth < self.num_layers:
            raise ValueError(
                f"ModelConfig.blank_skip_depth must lie in [0, num_layers - 1={self.num_layers - 1}] "
                f"(0 = none), got {self.blank_skip_depth}"
            )

    @property
    def input_features(self) -> str:
        """What the model reads: ``"fbank"`` (80-dim, the conformer) or ``"waveform"`` (16 kHz samples)."""
        return "fbank" if self.encoder == "conformer" else "waveform"

    @property
    def head_depths(self) -> Tuple[int, ...]:
        """Sorted depths with a CTC head: the exits and the model's depth (the final head)."""
        return tuple(sorted(set(self.exit_depths) | {self.num_layers}))

    def save(self, path: Path) -> None:
        save_config(self, path)

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        return load_config(cls, path)
