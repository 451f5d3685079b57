"""``dynenc train``: train a CTC model on the espeak-ng corpus with one dynamic-depth method.

Checkpoints (``model.pt`` best-by-dev, ``last.pt`` for resuming; state dicts + every
rank's RNG states, config as JSON beside, loaded with ``weights_only=True``) and a JSON-lines
log go to ``--out``. ``--resume`` continues bit-for-bit from ``last.pt``. Runs under
``torchrun`` (gloo on CPU, nccl on GPU) with no extra launcher: ``--strategy ddp`` or
``fsdp2``, whose checkpoints are sharded (``model.dcp/``, ``last.dcp/``: see
:mod:`dynenc.asr.checkpoint`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ..asr import CTCModel, load_checkpoint, save_checkpoint
from ..asr.checkpoint import (SHARDED_SUFFIX, find_checkpoint, load_sharded_state, read_payload, restore_state,
                              save_sharded_checkpoint)
from ..config import ModelConfig, load_config, save_config
from ..validation import check_device, check_int, check_real
from ..methods import get_method, method_names
from ..methods.base import Objective
from ..methods.layer_drop import check_gating
from ..methods.static import check_inter_ctc_weight
from .batching import SpeechBatches, collate_batch
from .evaluate import decode_split
from .features import load_split
from .tokenizer import load_tokenizer

# What ``last.pt`` holds beyond the model for a bit-exact resume.
RESUME_KEYS = ("optimizer", "scheduler", "rank_rng", "epoch", "best_wer", "train_seconds")
STRATEGIES = ("ddp", "fsdp2")


def recipe_model() -> ModelConfig:
    """The recipe's model: :class:`ModelConfig`'s defaults at 6 layers (the vocabulary size
    comes from the tokenizer, the method's own fields from the method)."""
    return ModelConfig(num_layers=6)


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters and the model to train (a JSON file via ``--config``;
    flags override it).

    Attributes:
        method: a registered method (``python -m dynenc.methods`` lists them).
        max_frames: padded feature frames per batch.
        warmup: fraction of the steps spent warming the learning rate up.
        drop_prob: layer_drop / dld drop probability.
        gating: layer_drop / dld gate granularity, ``"per_sample"`` (our choice) or
            ``"per_batch"`` (the authors' LD code); see :class:`~dynenc.methods.RandomLayerDrop`.
        kd_weight: dld lambda / blank_skip KD weight.
        hidden_weight: dld per-layer hidden-state alignment weight.
        teacher: dld teacher: a static model's checkpoint path, or ``"self"``.
        skip_threshold: blank_skip: train with skipping active at this tau (0 = off: every
            frame runs every layer in training, the paper's recipe).
        inter_ctc_weight: static with intermediate heads (``model.exit_layers``): the
            InterCTC weight of their mean loss (:class:`~dynenc.methods.static.StaticCTC`).
        init: optional checkpoint whose matching parameters initialise the model.
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
    drop_prob: float = 0.5
    gating: str = "per_sample"
    kd_weight: float = 1.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    teacher: str = "self"
    skip_threshold: float = 0.0
    inter_ctc_weight: float = 0.0
    init: str = ""
    spec_augment: bool = True
    strategy: str = "ddp"
    checkpoint_layers: bool = False
    model: ModelConfig = dataclasses.field(default_factory=recipe_model)

    def __post_init__(self) -> None:
        get_method(self.method)
        check_int("TrainConfig.epochs", self.epochs, low=1)
        check_int("TrainConfig.max_frames", self.max_frames, low=1)
        check_int("TrainConfig.seed", self.seed, low=0)
        check_gating("TrainConfig.gating", self.gating)
        check_real("TrainConfig.skip_threshold", self.skip_threshold, 0.0, 1.0)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"TrainConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name, low, high in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("warmup", 0.0, 1.0),
                                ("clip", 0.0, None), ("drop_prob", 0.0, 1.0), ("kd_weight", 0.0, None),
                                ("temperature", 0.0, None), ("hidden_weight", 0.0, None)):
            check_real(f"TrainConfig.{name}", getattr(self, name), low, high)
        check_inter_ctc_weight("TrainConfig.inter_ctc_weight", self.inter_ctc_weight)
        if self.lr == 0 or self.temperature == 0:
            raise ValueError(f"TrainConfig.lr and temperature must be > 0, got lr={self.lr}, "
                             f"temperature={self.temperature}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """``model`` with ``vocab_size`` and the fields the method needs where ``model`` leaves them unset."""
        method_fields = get_method(self.method).model_fields(self.model)
        return dataclasses.replace(self.model, vocab_size=vocab_size, **method_fields)


class ObjectiveModule(nn.Module):
    """``forward(batch) -> (loss, logs)``: the model and its objective as one module, so DDP
    sees the whole training forward (the objectives call several model entry points)."""

    def __init__(self, model: CTCModel, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Tuple[Tensor, ...]):
        return self.objective(self.model, batch)


def shard_model(root: nn.Module, model: CTCModel) -> None:
    """FSDP2 in place: ``fully_shard`` each encoder layer of ``model`` (its own all-gather /
    reduce-scatter unit, also when it runs on zero rows: see ``DynamicConformer._run_layer``),
    then ``root``, whose ``forward`` must be the one entry point that reads the other
    parameters (front-end, heads, selector)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.encoder.conformer_layers:
        fully_shard(layer)
    fully_shard(root)


def distribute(module: ObjectiveModule, strategy: str) -> nn.Module:
    """``module`` wrapped for data parallelism (a process group must be initialised):
    ``"ddp"`` (no find_unused_parameters needed: skipped layers still give zero gradients) or
    ``"fsdp2"`` (:func:`shard_model`; a DLD teacher model is sharded the same way). Each
    rank's loss is the mean over its own batch; both average gradients over ranks."""
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(module)
    teacher = getattr(module.objective, "teacher", None)
    if isinstance(teacher, CTCModel):
        shard_model(teacher, teacher)
    shard_model(module, module.model)
    return module


def spec_augment(features: Tensor, lengths: Tensor, generator: torch.Generator) -> Tensor:
    """Two frequency masks (<= 15 bins) and two time masks (<= 5 % of each utterance), in place."""
    batch, frames, bins = features.shape
    for b in range(batch):
        for _ in range(2):
            width = int(torch.randint(0, 16, (), generator=generator))
            start = int(torch.randint(0, bins - width + 1, (), generator=generator))
            features[b, :, start:start + width] = 0
            t_width = int(torch.randint(0, max(int(lengths[b]) // 20, 1) + 1, (), generator=generator))
            t_start = int(torch.randint(0, max(int(lengths[b]) - t_width, 0) + 1, (), generator=generator))
            features[b, t_start:t_start + t_width] = 0
    return features


def rank_batches(batches: SpeechBatches, epoch: int, rank: int, world: int) -> List[List[int]]:
    """This rank's batches of ``epoch``. Length bucketing makes the batch count vary from
    epoch to epoch (so the schedule's total is summed over epochs), and every rank takes
    the same number (a rank with one more step would wait forever in its all-reduce)."""
    batches.set_epoch(epoch)
    every = batches.batch_indices()
    return every[:len(every) - len(every) % world][rank::world]


def _distributed(device: torch.device) -> Tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_rng_states(augment_rng: torch.Generator, world: int) -> Tensor:
    """uint8 ``[world, 2, S]``: every rank's torch and augmentation RNG states (each rank
    draws its own masks and augmentations), the same tensor on every rank."""
    states = torch.stack([torch.get_rng_state(), augment_rng.get_state()])
    if world == 1:
        return states.unsqueeze(0)
    gathered = [torch.empty_like(states) for _ in range(world)]
    dist.all_gather(gathered, states)
    return torch.stack(gathered)


@contextlib.contextmanager
def _unsharded_root(module: nn.Module, sharded: bool) -> Iterator[None]:
    """The FSDP2 root's own parameters (front-end, heads) gathered for code that calls the
    model's entry points other than the root's ``forward`` (dev decoding); the layers gather
    theirs in their forward hooks."""
    if not sharded:
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def train(config: TrainConfig, data_dir: Path, out_dir: Path, resume: bool = False, progress: bool = True,
          limit_train: Optional[int] = None, limit_dev: Optional[int] = None,
          stop_after: Optional[int] = None, device: str = "cpu") -> Dict:
    """Train and return the final log record. ``limit_*`` truncate the splits and ``stop_after``
    ends after that many epochs as if interrupted (smoke tests). ``resume`` without
    ``out_dir/last.pt`` is an error. ``device`` ``"cuda"`` trains on the GPU (under torchrun,
    each rank on ``cuda:LOCAL_RANK``); checkpoints are the same either way (CPU tensors on load)."""
    device = check_device("device", device)
    rank, world = _distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    sharded = world > 1 and config.strategy == "fsdp2"
    checkpoint_suffix = SHARDED_SUFFIX if sharded else ".pt"
    last = out_dir / f"last{checkpoint_suffix}"
    if resume and find_checkpoint(out_dir, "last") != last:
        raise ValueError(f"cannot resume: no checkpoint {last} (train without --resume to start afresh)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(data_dir)
    train_data = load_split(data_dir, "train", progress=progress and rank == 0, tokenizer=tokenizer)[:limit_train]
    dev_data = load_split(data_dir, "dev", tokenizer=tokenizer)[:limit_dev]
    torch.manual_seed(config.seed)
    model = CTCModel(config.model_config(tokenizer.vocab_size))
    if config.init:
        source, _ = load_checkpoint(Path(config.init))
        missing = model.load_state_dict(source.state_dict(), strict=False)
        print(f"initialised from {config.init} (new parameters: {len(missing.missing_keys)})")
    model.encoder.checkpoint_layers = config.checkpoint_layers
    model.to(device)  # before the objective, which puts a teacher model beside it
    module: nn.Module = ObjectiveModule(model, get_method(config.method).objective(config, model))
    if world > 1:
        module = distribute(module, config.strategy)
    batches = SpeechBatches(train_data, tokenizer, max_frames=config.max_frames, shuffle=True, seed=config.seed)
    total_steps = sum(len(rank_batches(batches, epoch, rank, world)) for epoch in range(config.epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total_steps,
                                                    pct_start=config.warmup)
    start_epoch, best_wer, train_seconds = 0, float("inf"), 0.0
    augment_rng = torch.Generator().manual_seed(config.seed)
    if resume:
        if sharded:
            payload = {**load_sharded_state(last, model, optimizer), "optimizer": None}
        else:
            payload = read_payload(last)
        missing = [key for key in RESUME_KEYS if key not in payload]
        if missing:
            raise ValueError(f"cannot resume from {last}: it lacks {missing} (not a checkpoint written by dynenc "
                             "train)")
        if not sharded:
            restore_state(model, payload["model"], last)
            optimizer.load_state_dict(payload["optimizer"])
        if payload["rank_rng"].shape[0] != world:
            raise ValueError(f"cannot resume from {last}: it was written by {payload['rank_rng'].shape[0]} "
                             f"processes, this run has {world}")
        scheduler.load_state_dict(payload["scheduler"])
        # Copies: set_state reads a view's storage from its start (torch 2.14 crashes on [rank, 1]).
        torch.set_rng_state(payload["rank_rng"][rank, 0].clone())
        augment_rng.set_state(payload["rank_rng"][rank, 1].clone())
        start_epoch, best_wer, train_seconds = payload["epoch"] + 1, payload["best_wer"], payload["train_seconds"]
    log_path = out_dir / "log.jsonl"
    record: Dict = {}
    for epoch in range(start_epoch, min(config.epochs, stop_after or config.epochs)):
        module.train()
        indices = rank_batches(batches, epoch, rank, world)
        tic = time.perf_counter()
        bar = tqdm(indices, desc=f"{config.method} epoch {epoch + 1}/{config.epochs}", disable=not progress or rank)
        totals: Dict[str, float] = {}
        for idx in bar:
            features, lengths, targets, target_lengths = collate_batch([train_data[i] for i in idx], tokenizer)
            if config.spec_augment:
                features = spec_augment(features, lengths, augment_rng)
            loss, logs = module(tuple(t.to(device, non_blocking=True) for t in
                                      (features, lengths, targets, target_lengths)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            scheduler.step()
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds += time.perf_counter() - tic
        with _unsharded_root(module, sharded):  # every rank decodes the whole dev set: the same dev_wer
            dev_wer = decode_split(model, dev_data, tokenizer)["wer"]
        record = {"epoch": epoch + 1, "dev_wer": dev_wer, "train_seconds": round(train_seconds, 1),
                  **{k: v / max(len(indices), 1) for k, v in totals.items()}}
        if rank == 0:
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            if progress:
                print(json.dumps(record))
        improved = dev_wer <= best_wer
        best_wer = min(best_wer, dev_wer)
        resume_state = dict(scheduler=scheduler.state_dict(), rank_rng=_rank_rng_states(augment_rng, world),
                            epoch=epoch, best_wer=best_wer, train_seconds=train_seconds)
        if sharded:  # collective: every rank writes its shards
            if improved:
                save_sharded_checkpoint(out_dir / f"model{SHARDED_SUFFIX}", model, model, epoch=epoch,
                                        dev_wer=dev_wer)
            save_sharded_checkpoint(last, model, model, optimizer, **resume_state)
        elif rank == 0:
            if improved:
                save_checkpoint(out_dir / "model.pt", model, epoch=epoch, dev_wer=dev_wer)
            save_checkpoint(last, model, optimizer, **resume_state)
    if rank == 0:
        save_config(config, out_dir / "train_config.json")
    return record


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_field_flags(parser: argparse.ArgumentParser, cls: type, dest_prefix: str, skip: Tuple[str, ...]) -> None:
    """One ``--field-name`` flag per scalar (or tuple-of-int) field of dataclass ``cls``."""
    group = parser.add_argument_group(f"{cls.__name__} fields (default: the --config file, else the recipe's)")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if field.name in skip or kind not in (bool, int, float, str, Tuple[int, ...]):
            continue
        options: Dict[str, Any] = {"type": _parse_bool if kind is bool else kind}
        if kind == Tuple[int, ...]:
            options = {"type": int, "nargs": "*"}
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=dest_prefix + field.name, default=None,
                           metavar=field.name.upper(), **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=method_names(), help="dynamic-depth method (default static)")
    parser.add_argument("--data", default="data/speech", help="corpus directory made by `dynenc data`")
    parser.add_argument("--out", help="run directory (default runs/<method>)")
    parser.add_argument("--config", help="JSON file of TrainConfig fields (the model's under \"model\"); "
                        "flags override it")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (an error if there is none)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--quiet", action="store_true")
    _add_field_flags(parser, TrainConfig, "", skip=("method",))
    # The vocabulary comes from the tokenizer.
    _add_field_flags(parser, ModelConfig, "model.", skip=("vocab_size",))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """``--config`` (or the defaults) with the flags given on the command line on top."""
    config = load_config(TrainConfig, Path(args.config)) if args.config else TrainConfig()
    given = {name: value for name, value in vars(args).items() if value is not None}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = dataclasses.replace(config.model, **{name: given[f"model.{name}"] for name in model_fields
                                                 if f"model.{name}" in given})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return dataclasses.replace(config, model=model, **{name: given[name] for name in train_fields if name in given})


def run(args: argparse.Namespace) -> int:
    check_device("--device", args.device)
    config = config_from_args(args)
    if not Path(args.data, "train.jsonl").exists():
        raise ValueError(f"no corpus at {args.data}: run `dynenc data --out-dir {args.data}` first")
    out = Path(args.out or f"runs/{config.method}")
    train(config, Path(args.data), out, resume=args.resume, progress=not args.quiet, device=args.device)
    return 0
