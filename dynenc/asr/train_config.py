"""``dynenc train``'s configuration: :class:`TrainConfig` (a JSON file via ``--config``) and the
command-line flags made from its fields and the model's (help text from the docstrings).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Tuple

from ..config import load_config
from ..foundation.build import ENCODERS
from ..methods import get_method
from ..methods.layer_drop import GATINGS, check_gating
from ..methods.static import check_inter_ctc_weight
from ..validation import check_int, check_real
from .config import ModelConfig

__all__ = ["STRATEGIES", "TrainConfig", "default_model", "add_config_arguments", "config_from_args"]

STRATEGIES = ("ddp", "fsdp2")


def default_model() -> ModelConfig:
    """``dynenc train``'s default model: :class:`ModelConfig`'s defaults at 6 layers (the vocabulary size
    comes from the tokenizer, the method's own fields from the method)."""
    return ModelConfig(num_layers=6)


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters and the model to train (a JSON file via ``--config``;
    flags override it).

    Attributes:
        method: a registered method (``python -m dynenc.methods`` lists them).
        epochs: passes over the train split.
        max_frames: padded 10 ms frames per batch (a waveform model's batches hold the same audio).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup: fraction of the steps spent warming the learning rate up.
        clip: gradient-norm clipping threshold (0 = none).
        seed: seeds the weights, the batch order, the masks and SpecAugment.
        max_nonfinite_steps: consecutive steps with a non-finite loss or gradient (each skipped)
            after which training stops.
        drop_prob: layer_drop / dld drop probability.
        gating: layer_drop / dld gate granularity, ``"per_sample"`` (our choice) or
            ``"per_batch"`` (the authors' LD code); see :class:`~dynenc.methods.RandomLayerDrop`.
        kd_weight: dld lambda / blank_skip KD weight.
        temperature: dld / blank_skip distillation temperature.
        hidden_weight: dld per-layer hidden-state alignment weight.
        teacher: dld teacher: a static model's checkpoint path, or ``"self"``.
        skip_threshold: blank_skip: train with skipping active at this tau (0 = off: every
            frame runs every layer in training, the paper's recipe).
        inter_ctc_weight: static with intermediate heads (``model.exit_depths``): the
            InterCTC weight of their mean loss (:class:`~dynenc.methods.static.StaticCTC`).
        init: optional checkpoint whose matching parameters initialise the model.
        init_from: a pre-trained foundation encoder to fine-tune: a Hugging Face
            ``save_pretrained`` directory (wav2vec2, HuBERT, WavLM; a ``*ForCTC`` gives its base
            model) or a torchaudio ``Wav2Vec2Model``'s saved ``state_dict()`` (with
            ``init_factory``). Its architecture replaces the model's encoder and sizes; the
            heads are new.
        init_factory: the torchaudio factory of an ``init_from`` state dict's architecture
            (e.g. ``wavlm_base``, ``hubert_large``), optionally followed by a JSON object of its
            keyword arguments (``wavlm_model {...}``).
        spec_augment: SpecAugment time and frequency masks on the training features.
        strategy: data parallelism under ``torchrun``: ``"ddp"`` (replicated weights) or
            ``"fsdp2"`` (``fully_shard`` on every encoder layer and on the rest; sharded
            checkpoints). Ignored in a single process.
        checkpoint_layers: activation checkpointing of every executed encoder layer
            (:attr:`DynamicConformer.checkpoint_layers`).
        model: the model; :meth:`model_config` fills in the vocabulary and the method's fields.
    """

    method: str = "static"
    epochs: int = 20
    max_frames: int = 5000
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup: float = 0.1
    clip: float = 5.0
    seed: int = 0
    max_nonfinite_steps: int = 10
    drop_prob: float = 0.5
    gating: str = "per_sample"
    kd_weight: float = 1.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    teacher: str = "self"
    skip_threshold: float = 0.0
    inter_ctc_weight: float = 0.0
    init: str = ""
    init_from: str = ""
    init_factory: str = ""
    spec_augment: bool = True
    strategy: str = "ddp"
    checkpoint_layers: bool = False
    model: ModelConfig = dataclasses.field(default_factory=default_model)

    def __post_init__(self) -> None:
        get_method(self.method)
        check_int("TrainConfig.epochs", self.epochs, low=1)
        check_int("TrainConfig.max_frames", self.max_frames, low=1)
        check_int("TrainConfig.seed", self.seed, low=0)
        check_int("TrainConfig.max_nonfinite_steps", self.max_nonfinite_steps, low=1)
        check_gating("TrainConfig.gating", self.gating)
        check_real("TrainConfig.skip_threshold", self.skip_threshold, 0.0, 1.0)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"TrainConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name, low, high in (
            ("lr", 0.0, None),
            ("weight_decay", 0.0, None),
            ("warmup", 0.0, 1.0),
            ("clip", 0.0, None),
            ("drop_prob", 0.0, 1.0),
            ("kd_weight", 0.0, None),
            ("temperature", 0.0, None),
            ("hidden_weight", 0.0, None),
        ):
            check_real(f"TrainConfig.{name}", getattr(self, name), low, high)
        check_inter_ctc_weight("TrainConfig.inter_ctc_weight", self.inter_ctc_weight)
        if self.lr == 0 or self.temperature == 0:
            raise ValueError(
                f"TrainConfig.lr and temperature must be > 0, got lr={self.lr}, temperature={self.temperature}"
            )

    def model_config(self, vocab_size: int, **fields: Any) -> ModelConfig:
        """``model`` with ``vocab_size``, ``fields`` (e.g. a pre-trained encoder's sizes) and the
        fields the method needs where the result leaves them unset."""
        model = dataclasses.replace(self.model, vocab_size=vocab_size, **fields)
        return dataclasses.replace(model, **get_method(self.method).model_fields(model))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


#: Fields whose values are one of a few names: their flags take ``choices``.
FIELD_CHOICES = {"gating": GATINGS, "strategy": STRATEGIES, "encoder": ENCODERS}


def attribute_docs(cls: type) -> Dict[str, str]:
    """Each field's text in the ``Attributes:`` section of ``cls``'s docstring (one line;
    ``a, b: text`` documents both)."""
    docs: Dict[str, str] = {}
    names: List[str] = []
    section = (cls.__doc__ or "").partition("Attributes:")[2]
    for line in section.splitlines():
        entry = re.match(r"\s{4,8}(\w+(?:, \w+)*): (.*)", line)
        if entry and not line.startswith(" " * 12):
            names = entry.group(1).split(", ")
            docs.update({name: entry.group(2) for name in names})
        elif line.strip() and names:
            docs.update({name: docs[name] + " " + line.strip() for name in names})
    return docs


def _add_field_flags(parser: argparse.ArgumentParser, defaults: Any, dest_prefix: str, skip: Tuple[str, ...]) -> None:
    """One ``--field-name`` flag per scalar (or tuple-of-int) field of the dataclass instance
    ``defaults``, its help the field's docstring entry and its value there."""
    cls = type(defaults)
    group = parser.add_argument_group(f"{cls.__name__} fields (default: the --config file, else the one shown)")
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if field.name in skip or kind not in (bool, int, float, str, Tuple[int, ...]):
            continue
        options: Dict[str, Any] = {"type": _parse_bool if kind is bool else kind, "metavar": field.name.upper()}
        if kind == Tuple[int, ...]:
            options = {"type": int, "nargs": "*", "metavar": "N"}
        elif kind is bool:
            options["metavar"] = "{true,false}"
        elif field.name in FIELD_CHOICES:
            options = {"choices": FIELD_CHOICES[field.name]}
        # Plain text for the terminal: ``code`` and :role:`~a.b.Name` references read as their names.
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", docs.get(field.name, "")).replace("``", "").rstrip(".")
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=dest_prefix + field.name,
            default=None,
            help=f"{text} (default {getattr(defaults, field.name)!r})".replace("%", "%%"),
            **options,
        )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per field of :class:`TrainConfig` and of its model (the vocabulary comes from the
    tokenizer; the method has its own flag)."""
    defaults = TrainConfig()
    _add_field_flags(parser, defaults, "", skip=("method",))
    _add_field_flags(parser, defaults.model, "model.", skip=("vocab_size",))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """``--config`` (or the defaults) with the flags given on the command line on top."""
    config = load_config(TrainConfig, Path(args.config)) if args.config else TrainConfig()
    given = {name: value for name, value in vars(args).items() if value is not None}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = dataclasses.replace(
        config.model, **{name: given[f"model.{name}"] for name in model_fields if f"model.{name}" in given}
    )
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return dataclasses.replace(config, model=model, **{name: given[name] for name in train_fields if name in given})
