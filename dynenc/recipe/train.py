"""``dynenc train``: train a CTC model on the espeak-ng corpus with one dynamic-depth method.

Checkpoints (``model.pt`` best-by-dev, ``last.pt`` for resuming; state dicts + RNG states,
config as JSON beside, loaded with ``weights_only=True``) and a JSON-lines log go to
``--out``. ``--resume`` continues bit-for-bit from ``last.pt``. Runs under ``torchrun``
with DDP (gloo on CPU, nccl on GPU) with no extra launcher.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .. import methods
from ..asr import CTCModel, ModelConfig, load_checkpoint, save_checkpoint
from .data import CharTokenizer, SpeechBatches, collate_batch, load_split
from .evaluate import decode_split

METHODS = ("static", "layer_drop", "dld", "selector", "early_exit", "blank_skip")


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters (a JSON file via ``--config``; flags override it)."""

    method: str = "static"
    epochs: int = 20
    max_frames: int = 5000  # padded feature frames per batch
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup: float = 0.1  # fraction of steps
    clip: float = 5.0
    seed: int = 0
    drop_prob: float = 0.5  # layer_drop / dld
    kd_weight: float = 1.0  # dld lambda / blank_skip KD weight
    temperature: float = 1.0
    hidden_weight: float = 0.0  # dld per-layer alignment
    teacher: str = "self"  # dld: checkpoint path of the static model, or "self"
    init: str = ""  # optional checkpoint whose matching parameters initialise the model
    spec_augment: bool = True
    dim: int = 144
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 576
    kernel_size: int = 15
    dropout: float = 0.1

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read training config {path}: {error}") from error
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"training config {path} has unknown keys {sorted(unknown)}")
        return cls(**data)

    def model_config(self, vocab_size: int) -> ModelConfig:
        L = self.num_layers
        return ModelConfig(
            vocab_size=vocab_size, dim=self.dim, num_heads=self.num_heads, ffn_dim=self.ffn_dim, num_layers=L,
            kernel_size=self.kernel_size, dropout=self.dropout,
            exit_layers=tuple(range(2, L + 1, 2)) if self.method == "early_exit" else (),
            blank_skip_layer=L // 2 if self.method == "blank_skip" else 0,
            factorized_ctc=self.method == "blank_skip",
            selector_hidden=64 if self.method == "selector" else 0,
        )


class ObjectiveModule(nn.Module):
    """``forward(batch) -> (loss, logs)``: the model and its objective as one module, so DDP
    sees the whole training forward (the objectives call several model entry points)."""

    def __init__(self, model: CTCModel, objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Tuple[Tensor, ...]):
        return self.objective(self.model, batch)


def make_objective(config: TrainConfig, model: CTCModel):
    L = config.num_layers
    if config.method == "static":
        return methods.StaticCTC()
    if config.method == "layer_drop":
        return methods.LayerDropCTC(L, config.drop_prob)
    if config.method == "dld":
        teacher = "self" if config.teacher == "self" else load_checkpoint(Path(config.teacher))[0]
        return methods.DLDObjective(teacher, config.kd_weight, config.temperature, config.drop_prob,
                                    config.hidden_weight)
    if config.method == "selector":
        return methods.SelectorObjective(min_layers=1)
    if config.method == "early_exit":
        return methods.EarlyExitObjective()
    if config.method == "blank_skip":
        return methods.BlankSkipObjective(kd_weight=config.kd_weight, temperature=config.temperature)
    raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")


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


def _distributed() -> Tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(config: TrainConfig, data_dir: Path, out_dir: Path, resume: bool = False, progress: bool = True,
          limit_train: Optional[int] = None, limit_dev: Optional[int] = None,
          stop_after: Optional[int] = None) -> Dict:
    """Train and return the final log record. ``limit_*`` truncate the splits and ``stop_after``
    ends after that many epochs as if interrupted (smoke tests)."""
    rank, world = _distributed()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = CharTokenizer()
    train_data = load_split(data_dir, "train", progress=progress and rank == 0)[:limit_train]
    dev_data = load_split(data_dir, "dev")[:limit_dev]
    torch.manual_seed(config.seed)
    model = CTCModel(config.model_config(tokenizer.vocab_size))
    if config.init:
        source, _ = load_checkpoint(Path(config.init))
        missing = model.load_state_dict(source.state_dict(), strict=False)
        print(f"initialised from {config.init} (new parameters: {len(missing.missing_keys)})")
    module: nn.Module = ObjectiveModule(model, make_objective(config, model))
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module)
    batches = SpeechBatches(train_data, tokenizer, max_frames=config.max_frames, shuffle=True, seed=config.seed)
    steps_per_epoch = len(batches.batch_indices()[rank::world])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                    pct_start=config.warmup)
    start_epoch, best_wer, train_seconds = 0, float("inf"), 0.0
    augment_rng = torch.Generator().manual_seed(config.seed)
    last = out_dir / "last.pt"
    if resume and last.exists():
        payload = torch.load(last, weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng"])
        augment_rng.set_state(payload["augment_rng"])
        start_epoch, best_wer, train_seconds = payload["epoch"] + 1, payload["best_wer"], payload["train_seconds"]
    log_path = out_dir / "log.jsonl"
    record: Dict = {}
    for epoch in range(start_epoch, min(config.epochs, stop_after or config.epochs)):
        module.train()
        batches.set_epoch(epoch)
        indices = batches.batch_indices()[rank::world]
        tic = time.perf_counter()
        bar = tqdm(indices, desc=f"{config.method} epoch {epoch + 1}/{config.epochs}", disable=not progress or rank)
        totals: Dict[str, float] = {}
        for idx in bar:
            features, lengths, targets, target_lengths = collate_batch([train_data[i] for i in idx], tokenizer)
            if config.spec_augment:
                features = spec_augment(features, lengths, augment_rng)
            loss, logs = module((features, lengths, targets, target_lengths))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            scheduler.step()
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds += time.perf_counter() - tic
        dev_wer = decode_split(model, dev_data, tokenizer)["wer"]
        record = {"epoch": epoch + 1, "dev_wer": dev_wer, "train_seconds": round(train_seconds, 1),
                  **{k: v / max(len(indices), 1) for k, v in totals.items()}}
        if rank == 0:
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            if progress:
                print(json.dumps(record))
            if dev_wer <= best_wer:
                best_wer = dev_wer
                save_checkpoint(out_dir / "model.pt", model, epoch=epoch, dev_wer=dev_wer)
            save_checkpoint(last, model, optimizer, scheduler=scheduler.state_dict(),
                            augment_rng=augment_rng.get_state(), epoch=epoch, best_wer=best_wer,
                            train_seconds=train_seconds)
    if rank == 0:
        (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return record


_FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": lambda s: s.lower() in ("1", "true", "yes")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, help="dynamic-depth method (default static)")
    parser.add_argument("--data", default="data/speech", help="corpus directory made by `dynenc data`")
    parser.add_argument("--out", help="run directory (default runs/<method>)")
    parser.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--quiet", action="store_true")
    for field in dataclasses.fields(TrainConfig):
        if field.name != "method":
            kind = _FLAG_TYPES[str(field.type)]
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None)


def run(args: argparse.Namespace) -> int:
    config = TrainConfig.load(Path(args.config)) if args.config else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    config = dataclasses.replace(config, **overrides)
    if not Path(args.data, "train.jsonl").exists():
        raise SystemExit(f"no corpus at {args.data}: run `dynenc data --out-dir {args.data}` first")
    out = Path(args.out or f"runs/{config.method}")
    train(config, Path(args.data), out, resume=args.resume, progress=not args.quiet)
    return 0
