"""A CTC speech model around ``DynamicConformer``: conv front-end (4x subsampling),
the dynamic-depth encoder and a CTC head, plus the optional modules of the methods
(exit heads, the intermediate blank head, the layer selector)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import DynamicConformer, EncoderOutput
from .routing import valid_frames


class Conv2dSubsampling(nn.Module):
    """``[B, T, F]`` features -> ``[B, T', D]`` with ``T' = ((T - 1) // 2 - 1) // 2``.

    Two 3x3 stride-2 convolutions (valid padding, so output frames depend only on valid
    input frames) and a linear projection.
    """

    def __init__(self, num_features: int, dim: int, channels: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU())
        freq = ((num_features - 1) // 2 - 1) // 2
        self.proj = nn.Linear(channels * freq, dim)

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        return torch.div(torch.div(lengths - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor")

    def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.conv(features.unsqueeze(1))  # [B, C, T', F']
        h = self.proj(h.permute(0, 2, 1, 3).flatten(2))
        return h, self.output_lengths(lengths).clamp_min(1)


@dataclass
class ModelConfig:
    """Configuration of :class:`CTCModel` (saved as JSON next to checkpoints)."""

    vocab_size: int
    num_features: int = 80
    dim: int = 144
    num_heads: int = 4
    ffn_dim: int = 576
    num_layers: int = 8
    kernel_size: int = 15
    dropout: float = 0.1
    exit_layers: Tuple[int, ...] = ()  # 1-based layers with an exit head (early exits)
    blank_skip_layer: int = 0  # 1-based layer K with the intermediate blank head (0 = none)
    factorized_ctc: bool = False  # intermediate head predicts p(blank) and p(token | non-blank)
    selector_hidden: int = 0  # hidden size of the input-conditioned layer selector (0 = none)
    extra: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read model config {path}: {error}") from error
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model config {path} has unknown keys {sorted(unknown)}")
        data["exit_layers"] = tuple(data.get("exit_layers", ()))
        return cls(**data)


class CTCModel(nn.Module):
    """Front-end + ``DynamicConformer`` + CTC head (+ the methods' optional modules).

    ``forward(features [B, T, F], lengths [B], **routing)`` returns
    ``(log_probs [B, T', V], lengths [B], EncoderOutput)``; ``routing`` goes to
    :meth:`DynamicConformer.forward` (``layer_mask``, ``depth``, ``gates``, ``policy``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from .methods.blank_skip import BlankHead  # methods import this module
        from .methods.selector import LayerSelector

        self.config = config
        self.frontend = Conv2dSubsampling(config.num_features, config.dim)
        self.encoder = DynamicConformer(config.dim, config.num_heads, config.ffn_dim, config.num_layers,
                                        config.kernel_size, dropout=config.dropout)
        self.ctc_head = nn.Linear(config.dim, config.vocab_size)
        for layer in config.exit_layers:
            if not 1 <= layer <= config.num_layers:
                raise ValueError(f"exit_layers must lie in [1, {config.num_layers}], got {layer}")
        self.exit_heads = nn.ModuleDict({str(l): nn.Linear(config.dim, config.vocab_size) for l in config.exit_layers
                                         if l != config.num_layers})
        if not 0 <= config.blank_skip_layer < config.num_layers:
            raise ValueError(f"blank_skip_layer must lie in [0, {config.num_layers - 1}], got {config.blank_skip_layer}")
        self.blank_head = (BlankHead(config.dim, config.vocab_size, config.factorized_ctc)
                           if config.blank_skip_layer else None)
        self.selector = (LayerSelector(config.dim, config.num_layers, config.selector_hidden)
                         if config.selector_hidden else None)

    def exit_head(self, layer: int) -> nn.Linear:
        """The CTC head read after 1-based ``layer`` (the final head for the last layer)."""
        return self.ctc_head if layer == self.config.num_layers else self.exit_heads[str(layer)]

    def embed(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """Front-end: ``[B, T, F]`` -> ``([B, T', D], lengths')`` (the encoder's input)."""
        if features.dim() != 3 or features.shape[2] != self.config.num_features:
            raise ValueError(f"features must be [B, T, {self.config.num_features}], got {tuple(features.shape)}")
        if features.shape[1] < 7:
            raise ValueError(f"features need at least 7 frames for 4x subsampling, got {features.shape[1]}")
        return self.frontend(features, lengths)

    def forward(self, features: Tensor, lengths: Tensor, **routing) -> Tuple[Tensor, Tensor, EncoderOutput]:
        x, x_lengths = self.embed(features, lengths)
        return self.encode(x, x_lengths, **routing)

    def encode(self, x: Tensor, lengths: Tensor, **routing) -> Tuple[Tensor, Tensor, EncoderOutput]:
        """Encoder + final CTC head on already embedded ``x [B, T', D]``."""
        out = self.encoder(x, lengths, return_report=True, **routing)
        return F.log_softmax(self.ctc_head(out.output), dim=-1), lengths, out


def ctc_loss(log_probs: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
    """Mean-over-batch CTC loss (per-utterance sum over frames divided by target length)."""
    return F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=0, reduction="mean",
                      zero_infinity=True)


def masked_mean(values: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``values [B, T]`` over valid frames."""
    valid = valid_frames(lengths, values.shape[1])
    return (values * valid).sum() / valid.sum().clamp_min(1)


def save_checkpoint(path: Path, model: CTCModel, optimizer: Optional[torch.optim.Optimizer] = None, **state) -> None:
    """State dicts (+ RNG state for bit-exact resume) with ``torch.save``; config as JSON beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.config.save(path.with_suffix(".json"))
    payload = {"model": model.state_dict(), "rng": torch.get_rng_state(), **state}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    torch.save(payload, path)


def load_checkpoint(path: Path, map_location: str = "cpu") -> Tuple[CTCModel, dict]:
    """Loads a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    config = ModelConfig.load(path.with_suffix(".json"))
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = CTCModel(config)
    model.load_state_dict(payload["model"], strict=True)
    return model, payload


def distillation_kl(teacher_log_probs: Tensor, student_log_probs: Tensor, lengths: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(teacher || student)`` of frame posteriors at temperature T, mean over valid frames.

    Both inputs are log-probabilities ``[B, T', V]``; softening at temperature T is
    ``log_softmax(log_p / T)`` (the same as softening the logits).
    """
    teacher = F.log_softmax(teacher_log_probs.detach() / temperature, dim=-1)
    student = F.log_softmax(student_log_probs / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return masked_mean(kl, lengths) * temperature**2
