"""``dynenc train``: train a CTC model on a data directory (:mod:`dynenc.asr.manifest`) with
one dynamic-depth method.

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
import json
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ..config import save_config
from ..errors import NonFiniteTraining
from ..fileio import atomic_write
from ..foundation.build import load_pretrained, split_model
from ..methods import get_method, method_names
from ..methods.base import Batch, Logs, Objective
from ..runlock import hold_run_directory
from ..validation import check_device
from .batching import SpeechBatches, collate_batch
from .checkpoint import (
    SHARDED_SUFFIX,
    find_checkpoint,
    load_checkpoint,
    load_sharded_state,
    read_payload,
    restore_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .ctc_model import CTCModel
from .evaluate import decode_split
from .features import ROWS_PER_FRAME, load_split
from .tokenizer import load_tokenizer
from .train_config import TrainConfig, add_config_arguments, config_from_args

__all__ = ["TrainConfig", "ObjectiveModule", "train", "distribute", "shard_model", "add_arguments", "run"]

# What ``last.pt`` holds beyond the model for a bit-exact resume.
RESUME_KEYS = ("optimizer", "scheduler", "rank_rng", "epoch", "best_wer", "train_seconds")


class ObjectiveModule(nn.Module):
    """``forward(batch) -> (loss, logs)``: the model and its objective as one module, so DDP
    sees the whole training forward (the objectives call several model entry points)."""

    def __init__(self, model: CTCModel, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch) -> Tuple[Tensor, Logs]:
        return self.objective(self.model, batch)


def shard_model(root: nn.Module, model: CTCModel) -> None:
    """FSDP2 in place: ``fully_shard`` each encoder layer of ``model`` that only its own forward
    reads (its own all-gather / reduce-scatter unit, also when it runs on zero rows: see
    ``RoutedEncoder._run_layer``; :meth:`~dynenc.engine.RoutedEncoder.shardable_layers`), then
    ``root``, whose ``forward`` must be the one entry point that reads the other parameters
    (front-end, heads, selector, a layer others read)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.encoder.shardable_layers():
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
            features[b, :, start : start + width] = 0
            t_width = int(torch.randint(0, max(int(lengths[b]) // 20, 1) + 1, (), generator=generator))
            t_start = int(torch.randint(0, max(int(lengths[b]) - t_width, 0) + 1, (), generator=generator))
            features[b, t_start : t_start + t_width] = 0
    return features


def rank_batches(batches: SpeechBatches, epoch: int, rank: int, world: int) -> List[List[int]]:
    """This rank's batches of ``epoch``. Length bucketing makes the batch count vary from
    epoch to epoch (so the schedule's total is summed over epochs), and every rank takes
    the same number (a rank with one more step would wait forever in its all-reduce)."""
    batches.set_epoch(epoch)
    every = batches.batch_indices()
    return every[: len(every) - len(every) % world][rank::world]


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
    root = cast(FSDPModule, module)
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def train(
    config: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    limit_train: Optional[int] = None,
    limit_dev: Optional[int] = None,
    stop_after: Optional[int] = None,
    device: str = "cpu",
) -> Dict:
    """Train and return the final log record. ``limit_*`` truncate the splits and ``stop_after``
    ends after that many epochs as if interrupted (smoke tests). ``resume`` without
    ``out_dir/last.pt`` is an error. ``device`` ``"cuda"`` trains on the GPU (under torchrun,
    each rank on ``cuda:LOCAL_RANK``); checkpoints are the same either way (CPU tensors on load).

    The job holds ``out_dir``'s lock throughout (:mod:`dynenc.runlock`). A step whose loss or
    gradient is not finite is skipped on every rank (counted as ``skipped_steps`` in the log);
    ``config.max_nonfinite_steps`` of them in a row stop training (:class:`NonFiniteTraining`).

    Raises:
        RunDirectoryLocked: another job is writing ``out_dir``.
        NonFiniteTraining: the loss or gradients stayed non-finite, or the weights became so.
        ValueError: bad data, a ``--resume`` / ``--init`` checkpoint that does not fit the model.
    """
    target = check_device("device", device)
    rank, world = _distributed(target)
    if target.type == "cuda" and world > 1:
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    # Sharded (FSDP2) runs keep a checkpoint directory, the others one file.
    last = out_dir / f"last{SHARDED_SUFFIX if world > 1 and config.strategy == 'fsdp2' else '.pt'}"
    if resume and find_checkpoint(out_dir, "last") != last:
        raise ValueError(f"cannot resume: no checkpoint {last} (train without --resume to start afresh)")
    with hold_run_directory(out_dir, rank, world):
        return _train(config, data_dir, last, resume, progress, limit_train, limit_dev, stop_after, target, rank, world)


def _train(
    config: TrainConfig,
    data_dir: Path,
    last: Path,
    resume: bool,
    progress: bool,
    limit_train: Optional[int],
    limit_dev: Optional[int],
    stop_after: Optional[int],
    device: torch.device,
    rank: int,
    world: int,
) -> Dict:
    out_dir, sharded = last.parent, last.suffix == SHARDED_SUFFIX
    tokenizer = load_tokenizer(data_dir)
    torch.manual_seed(config.seed)
    model = initial_model(config, tokenizer.vocab_size)
    kind = model.config.input_features
    train_data = load_split(data_dir, "train", progress=progress and rank == 0, tokenizer=tokenizer, features=kind)
    train_data = train_data[:limit_train]
    dev_data = load_split(data_dir, "dev", tokenizer=tokenizer, features=kind)[:limit_dev]
    if config.init:
        source, _ = load_checkpoint(Path(config.init))
        missing = restore_state(model, source.state_dict(), Path(config.init), strict=False)
        print(f"initialised from {config.init} (new parameters: {len(missing)})")
    model.encoder.checkpoint_layers = config.checkpoint_layers
    model.to(device)  # before the objective, which puts a teacher model beside it
    objective = ObjectiveModule(model, get_method(config.method).objective(config, model))
    module = distribute(objective, config.strategy) if world > 1 else objective
    rows = config.max_frames * ROWS_PER_FRAME[kind]
    batches = SpeechBatches(train_data, tokenizer, max_frames=rows, shuffle=True, seed=config.seed)
    total_steps = sum(len(rank_batches(batches, epoch, rank, world)) for epoch in range(config.epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=total_steps, pct_start=config.warmup
    )
    start_epoch, best_wer, train_seconds = 0, float("inf"), 0.0
    augment_rng = torch.Generator().manual_seed(config.seed)
    if resume:
        if sharded:
            payload = {**load_sharded_state(last, model, optimizer), "optimizer": None}
        else:
            payload = read_payload(last)
        missing = [key for key in RESUME_KEYS if key not in payload]
        if missing:
            raise ValueError(
                f"cannot resume from {last}: it lacks {missing} (not a checkpoint written by dynenc train)"
            )
        if not sharded:
            restore_state(model, payload["model"], last)
            optimizer.load_state_dict(payload["optimizer"])
        if payload["rank_rng"].shape[0] != world:
            raise ValueError(
                f"cannot resume from {last}: it was written by {payload['rank_rng'].shape[0]} "
                f"processes, this run has {world}"
            )
        scheduler.load_state_dict(payload["scheduler"])
        # Copies: set_state reads a view's storage from its start (torch 2.14 crashes on [rank, 1]).
        torch.set_rng_state(payload["rank_rng"][rank, 0].clone())
        augment_rng.set_state(payload["rank_rng"][rank, 1].clone())
        start_epoch, best_wer, train_seconds = payload["epoch"] + 1, payload["best_wer"], payload["train_seconds"]
    log_path = out_dir / "log.jsonl"
    if rank == 0 and log_path.exists():
        _keep_logged_epochs(log_path, start_epoch)
    record: Dict = {}
    consecutive = 0  # non-finite steps in a row, across epochs
    for epoch in range(start_epoch, min(config.epochs, stop_after or config.epochs)):
        module.train()
        indices = rank_batches(batches, epoch, rank, world)
        tic = time.perf_counter()
        bar = tqdm(
            indices, desc=f"{config.method} epoch {epoch + 1}/{config.epochs}", disable=not progress or rank != 0
        )
        totals: Dict[str, float] = {}
        skipped = 0
        for step, idx in enumerate(bar):
            features, lengths, targets, target_lengths = collate_batch([train_data[i] for i in idx], tokenizer)
            if config.spec_augment and kind == "fbank":  # a HF foundation model masks inside (its config)
                features = spec_augment(features, lengths, augment_rng)
            loss, logs = module(
                tuple(t.to(device, non_blocking=True) for t in (features, lengths, targets, target_lengths))
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip or float("inf"))
            if not _all_finite(loss, grad_norm, world):
                skipped, consecutive = skipped + 1, consecutive + 1
                if consecutive >= config.max_nonfinite_steps:
                    raise NonFiniteTraining(
                        f"training stopped at epoch {epoch + 1} step {step + 1}: the loss or "
                        f"gradients were not finite for {consecutive} steps in a row "
                        "(lower --lr, or set --clip)"
                    )
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # the schedule keeps its length: a skipped step still counts
                continue
            consecutive = 0
            optimizer.step()
            scheduler.step()
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds += time.perf_counter() - tic
        _check_finite_weights(model, world, epoch)
        with _unsharded_root(module, sharded):  # every rank decodes the whole dev set: the same dev_wer
            dev_wer = decode_split(model, dev_data, tokenizer)["wer"]
        record = {
            "epoch": epoch + 1,
            "dev_wer": dev_wer,
            "train_seconds": round(train_seconds, 1),
            "skipped_steps": skipped,
            **{k: v / max(len(indices) - skipped, 1) for k, v in totals.items()},
        }
        if rank == 0:
            with log_path.open("a") as log:
                log.write(json.dumps(record, allow_nan=False) + "\n")
            if progress:
                print(json.dumps(record))
        improved = dev_wer <= best_wer
        best_wer = min(best_wer, dev_wer)
        resume_state = dict(
            scheduler=scheduler.state_dict(),
            rank_rng=_rank_rng_states(augment_rng, world),
            epoch=epoch,
            best_wer=best_wer,
            train_seconds=train_seconds,
        )
        if sharded:  # collective: every rank writes its shards
            if improved:
                save_sharded_checkpoint(out_dir / f"model{SHARDED_SUFFIX}", model, model, epoch=epoch, dev_wer=dev_wer)
            save_sharded_checkpoint(last, model, model, optimizer, **resume_state)
        elif rank == 0:
            if improved:
                save_checkpoint(out_dir / "model.pt", model, epoch=epoch, dev_wer=dev_wer)
            save_checkpoint(last, model, optimizer, **resume_state)
    if rank == 0:
        save_config(config, out_dir / "train_config.json")
    return record


def initial_model(config: TrainConfig, vocab_size: int) -> CTCModel:
    """The model to train: from the config, or around the pre-trained encoder of
    ``config.init_from`` (its architecture and weights; new heads)."""
    if not config.init_from:
        return CTCModel(config.model_config(vocab_size))
    description, upstream = load_pretrained(Path(config.init_from), config.init_factory)
    frontend, encoder = split_model(upstream)
    # torchaudio builds HuBERT with wav2vec2's factory: its checkpoints read as "wav2vec2".
    family = {"wavlm_model": "wavlm", "wav2vec2_model": "wav2vec2"}.get(
        description.get("factory", ""), description.get("model_type", "")
    )
    asked = config.model.encoder
    if asked not in ("conformer", family) and (asked, family) != ("hubert", "wav2vec2"):
        raise ValueError(f"--init-from {config.init_from} holds a {family} encoder, not --encoder {asked}")
    sizes = dict(
        encoder=family if asked == "conformer" else asked,
        upstream=description,
        dim=encoder.input_dim,
        num_heads=encoder.num_heads,
        ffn_dim=encoder.ffn_dim,
        num_layers=encoder.num_layers,
    )
    model = CTCModel(config.model_config(vocab_size, **sizes))
    model.frontend.load_state_dict(frontend.state_dict())
    model.encoder.load_state_dict(encoder.state_dict())
    print(f"fine-tuning the {family} encoder of {config.init_from}: {encoder.num_layers} layers, D={encoder.input_dim}")
    return model


def _keep_logged_epochs(log_path: Path, epochs: int) -> None:
    """Cut ``log_path`` to its first ``epochs`` epochs: a job killed after logging an epoch but
    before saving ``last.pt`` redoes that epoch on resume, which must not log it twice."""
    lines = log_path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= epochs]
    if len(kept) != len(lines):
        atomic_write({log_path: lambda file: file.write("".join(line + "\n" for line in kept).encode())})


def _all_finite(loss: Tensor, grad_norm: Tensor, world: int) -> bool:
    """Whether this step's loss and gradient norm are finite on every rank (one all-reduce:
    every rank decides the same, so a skipped step never desynchronises the collectives)."""
    if isinstance(grad_norm, DTensor):  # FSDP2: the (replicated) global norm
        grad_norm = grad_norm.full_tensor()
    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm.detach())).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _check_finite_weights(model: nn.Module, world: int, epoch: int) -> None:
    """Raise :class:`NonFiniteTraining` before a checkpoint could store a non-finite weight
    (each rank checks its own shards; the verdict is every rank's)."""
    bad = [
        name
        for name, p in model.named_parameters()
        if not torch.isfinite((p.to_local() if isinstance(p, DTensor) else p).detach()).all()
    ]
    flag = torch.tensor([float(bool(bad))])
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise NonFiniteTraining(
            f"training stopped after epoch {epoch + 1}: non-finite weights"
            f"{' (' + bad[0] + ')' if bad else ' on another rank'}; nothing was saved for this "
            "epoch (lower --lr, or set --clip)"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=method_names(), help="dynamic-depth method (default static)")
    parser.add_argument(
        "--data",
        required=True,
        help="data directory: train/dev/test.jsonl manifests (dynenc.asr.manifest), checked by `dynenc prepare`",
    )
    parser.add_argument("--out", help="run directory (default runs/<method>)")
    parser.add_argument(
        "--config", help='JSON file of TrainConfig fields (the model\'s under "model"); flags override it'
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (an error if there is none)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_device("--device", args.device)
    config = config_from_args(args)
    if not Path(args.data, "train.jsonl").exists():
        raise ValueError(
            f"no corpus at {args.data}: --data must be a data directory with train.jsonl, dev.jsonl "
            "and test.jsonl (see `dynenc prepare --help`)"
        )
    out = Path(args.out or f"runs/{config.method}")
    train(config, Path(args.data), out, resume=args.resume, progress=not args.quiet, device=args.device)
    return 0
