"""Run by ``torchrun --nproc-per-node 2``: FSDP2 training with random per-sample masks
(layer_drop, activation checkpointing, SpecAugment) of a tiny model, 2 epochs straight into
``<out>/layer_drop`` and, into ``<out>/resumed``, 1 epoch then ``resume`` for the second."""
import sys
from pathlib import Path

import torch

from dynenc.asr import ModelConfig
from dynenc.asr.train import TrainConfig, train

CONFIG = TrainConfig(method="layer_drop", strategy="fsdp2", checkpoint_layers=True, epochs=2, max_frames=1500,
                     model=ModelConfig(dim=32, num_layers=4, num_heads=2, ffn_dim=64, kernel_size=5, dropout=0.0))

if __name__ == "__main__":
    torch.set_num_threads(1)
    corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
    train(CONFIG, corpus, out / "layer_drop", progress=False)
    train(CONFIG, corpus, out / "resumed", progress=False, stop_after=1)
    train(CONFIG, corpus, out / "resumed", resume=True, progress=False)
