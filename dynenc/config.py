"""The one model configuration (:class:`ModelConfig`) and the one JSON loader for every
configuration dataclass (model, training, benchmark).

``ModelConfig`` is what a checkpoint stores beside its weights, what ``dynenc train`` /
``dynenc eval`` / ``dynenc bench`` build models from, and the only place its defaults live.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Type, TypeVar

from .fileio import atomic_write

Config = TypeVar("Config")


def _expected_type(annotation: Any) -> Tuple[type, ...]:
    """The runtime types a field annotation admits (``int`` also for ``float`` fields)."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, Tuple):
        return (list, tuple)
    if origin is dict or annotation is dict:
        return (dict,)
    if annotation is float:
        return (int, float)
    return (annotation,)


def config_from_dict(cls: Type[Config], data: Mapping[str, Any], what: str) -> Config:
    """Build dataclass ``cls`` from a JSON-like mapping, naming the first bad key or value.

    Unknown keys, ``null`` values and values of the wrong type raise ``ValueError`` /
    ``TypeError`` that name ``what`` (e.g. the file) and the field.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; expected a subset of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        nested = hints[name]
        if dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            values[name] = config_from_dict(nested, value, f"{what} field {name!r}")
            continue
        expected = _expected_type(nested)
        if value is None or isinstance(value, bool) != (bool in expected) or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            raise TypeError(f"{what} field {name!r} must be {names}, got {value!r}")
        values[name] = tuple(value) if list in expected else value
    return cls(**values)


def load_config(cls: Type[Config], path: Path) -> Config:
    """Read dataclass ``cls`` from the JSON file ``path`` (see :func:`config_from_dict`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read config file {path}: {error}") from error
    return config_from_dict(cls, data, f"config file {path}")


def config_json(config: Any) -> str:
    """The JSON text of a configuration dataclass (what :func:`load_config` reads back)."""
    return json.dumps(asdict(config), indent=2) + "\n"


def save_config(config: Any, path: Path) -> None:
    atomic_write({Path(path): lambda file: file.write(config_json(config).encode())})


@dataclass
class ModelConfig:
    """A CTC speech model: front-end + ``DynamicConformer`` + heads.

    Attributes:
        vocab_size: CTC output units including the blank (index 0).
        num_features: input feature bins (80-dim fbank).
        dim, num_heads, ffn_dim, num_layers, kernel_size, dropout: the Conformer
            (``torchaudio.models.Conformer``'s input_dim, num_heads, ffn_dim, num_layers,
            depthwise_conv_kernel_size, dropout).
        exit_layers: 1-based layers with an early-exit CTC head.
        blank_skip_layer: 1-based layer K with the intermediate blank head (0 = none).
        factorized_ctc: the intermediate head predicts p(blank) and p(token | non-blank).
        factorized_final_ctc: the final CTC head is factorized the same way.
        selector_hidden: hidden size of the input-conditioned layer selector (0 = none).
        extra: free-form metadata kept with checkpoints.
    """

    vocab_size: int = 32
    num_features: int = 80
    dim: int = 144
    num_heads: int = 4
    ffn_dim: int = 576
    num_layers: int = 8
    kernel_size: int = 15
    dropout: float = 0.1
    exit_layers: Tuple[int, ...] = ()
    blank_skip_layer: int = 0
    factorized_ctc: bool = False
    factorized_final_ctc: bool = False
    selector_hidden: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.exit_layers = tuple(self.exit_layers)
        for name in ("vocab_size", "num_features", "dim", "num_heads", "ffn_dim", "num_layers", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"ModelConfig.vocab_size must be >= 2 (blank + one unit), got {self.vocab_size}")
        if self.num_features < 7:
            raise ValueError(f"ModelConfig.num_features must be >= 7 for the 4x front-end, got {self.num_features}")
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"ModelConfig.kernel_size must be odd, got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}")
        for layer in self.exit_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= self.num_layers:
                raise ValueError(f"ModelConfig.exit_layers must lie in [1, num_layers={self.num_layers}], "
                                 f"got {list(self.exit_layers)}")
        if not 0 <= self.blank_skip_layer < self.num_layers:
            raise ValueError(f"ModelConfig.blank_skip_layer must lie in [0, num_layers - 1={self.num_layers - 1}] "
                             f"(0 = none), got {self.blank_skip_layer}")
        if self.selector_hidden < 0:
            raise ValueError(f"ModelConfig.selector_hidden must be >= 0 (0 = none), got {self.selector_hidden}")

    @property
    def exit_set(self) -> Tuple[int, ...]:
        """Sorted 1-based exit layers including the last layer (the final head)."""
        return tuple(sorted(set(self.exit_layers) | {self.num_layers}))

    def save(self, path: Path) -> None:
        save_config(self, path)

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        return load_config(cls, path)
