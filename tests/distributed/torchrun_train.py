"""Run by ``torchrun --nproc-per-node 2``: FSDP2 training with random per-sample masks
(layer_drop, activation checkpointing, SpecAugment) of a tiny model, 2 epochs straight into
``<out>/layer_drop`` and, into ``<out>/resumed``, 1 epoch then ``resume`` for the second.

``... <corpus> <out> nan <ddp|fsdp2>`` instead trains one epoch into ``<out>/nan`` where rank 1's
first step has a NaN loss, and writes each rank's final log record to ``<out>/nan/rank<r>.json``;
``... diverge <ddp|fsdp2>`` trains into ``<out>/diverge`` at lr 1e6 without clipping and writes
each rank's error (or final record) to ``<out>/diverge/rank<r>.json``."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dynenc.asr import ModelConfig
from dynenc.asr.train import ObjectiveModule, TrainConfig, train
from dynenc.errors import NonFiniteTraining

CONFIG = TrainConfig(method="layer_drop", strategy="fsdp2", checkpoint_layers=True, epochs=2, max_frames=1500,
                     model=ModelConfig(dim=32, num_layers=4, num_heads=2, ffn_dim=64, kernel_size=5, dropout=0.0))



def train_with_a_nan_on_rank_1(corpus: Path, out: Path, strategy: str) -> None:
    rank, forward, calls = int(os.environ["RANK"]), ObjectiveModule.forward, []

    def nan_at_rank_1_step_1(self, batch):
        loss, logs = forward(self, batch)
        calls.append(1)
        return (loss * float("nan"), logs) if rank == 1 and len(calls) == 1 else (loss, logs)

    ObjectiveModule.forward = nan_at_rank_1_step_1
    config = dataclasses.replace(CONFIG, strategy=strategy, checkpoint_layers=False, epochs=1)
    record = train(config, corpus, out, progress=False)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def train_diverging(corpus: Path, out: Path, strategy: str) -> None:
    config = dataclasses.replace(CONFIG, strategy=strategy, checkpoint_layers=False, epochs=3, lr=1e6, clip=0.0,
                                 max_nonfinite_steps=2)
    try:
        outcome = {"record": train(config, corpus, out, progress=False)}
    except NonFiniteTraining as error:
        outcome = {"error": str(error)}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    torch.set_num_threads(1)
    corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
    if sys.argv[3:4] in (["nan"], ["diverge"]):
        {"nan": train_with_a_nan_on_rank_1, "diverge": train_diverging}[sys.argv[3]](corpus, out / sys.argv[3], sys.argv[4])
        dist.destroy_process_group()  # a clean teardown, also after a rank's error
        sys.exit(0)
    train(CONFIG, corpus, out / "layer_drop", progress=False)
    train(CONFIG, corpus, out / "resumed", progress=False, stop_after=1)
    train(CONFIG, corpus, out / "resumed", resume=True, progress=False)
