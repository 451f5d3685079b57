"""What every benchmark runs on: the run's sizes (:class:`BenchConfig`), the inputs, the peer
models built from one set of weights, and the :class:`Workload` that shares them."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from dynenc.asr import CTCModel
from dynenc.asr import ModelConfig
from dynenc.model import DynamicConformer
from dynenc.routing import Schedule, pack, valid_frames


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run: the model (:class:`dynenc.asr.ModelConfig`, the same
    for every peer) and the workload around it.

    ``frames`` is T, the longest sequence; lengths are spread evenly over
    ``[min_length * T, T]`` (shuffled). The ``ops`` figure uses ``op_dim`` channels (the
    routing-overhead target is stated at D = 256) on the same rows.

    ``full``: every case of every figure (:data:`FULL`, ``dynenc bench --full``). Without it
    (the default run) the figures leave out their secondary cases and extra sweep points —
    those that no target and none of the headline ratios need — and the run takes the median
    of fewer rounds; the sizes stay the same.
    """

    # dropout 0: torchaudio's Conformer default, so the training steps time no dropout masks
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dropout=0.0))
    batch: int = 16
    frames: int = 256
    min_length: float = 0.3
    fractions: Tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    op_dim: int = 256
    # Single rounds on a 2-core CPU vary by several %: a full run takes the median of 9; the
    # default run the median of 3 (round-robin, so drift still hits every peer of a figure alike).
    repeats: int = 3
    warmup: int = 1
    op_min_time: float = 0.02  # seconds per op measurement (ops repeat inside one measurement)
    seed: int = 0
    full: bool = False

    def __post_init__(self) -> None:
        for name in ("batch", "frames", "op_dim", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.op_dim % self.model.num_heads:
            raise ValueError(f"--op-dim ({self.op_dim}) must be divisible by --num-heads ({self.model.num_heads})")
        if not 0 < self.min_length <= 1:
            raise ValueError(f"min_length must lie in (0, 1], got {self.min_length}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or 1.0 not in self.fractions:
            raise ValueError(f"fractions must lie in (0, 1] and include 1.0, got {self.fractions}")

    @property
    def op_ffn_dim(self) -> int:
        """FFN width of the ``ops`` figure's layer: the model's FFN ratio at ``op_dim``."""
        return self.model.ffn_dim * self.op_dim // self.model.dim


#: The complete run (``--full``): the default sizes, every case, the median of 9 rounds.
FULL = BenchConfig(repeats=9, full=True)

#: Tiny sizes for smoke runs (``--quick``) and the CI test: every case, one round.
QUICK = BenchConfig(model=ModelConfig(vocab_size=8, num_features=16, dim=32, num_heads=2, ffn_dim=64, num_layers=4,
                                      kernel_size=5, dropout=0.0),
                    batch=4, frames=24, op_dim=32, repeats=1, warmup=0, op_min_time=0.0, full=True)


def blank_skip_depth(num_layers: int) -> int:
    """Depth after which the benchmark's CTC model skips blank frames: L/2 (0, no
    skipping, for a one-layer model)."""
    return max(1, num_layers // 2) if num_layers > 1 else 0


def exit_depths(num_layers: int) -> Tuple[int, ...]:
    """Early-exit depths of the benchmark's CTC model: at L/4, L/2, 3L/4 (the last layer
    is the final head, not an exit)."""
    return tuple(sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)} - {num_layers}))


def spread_lengths(batch: int, frames: int, min_length: float, generator: torch.Generator) -> Tensor:
    """int64 ``[B]`` lengths spread evenly over ``[min_length * T, T]`` in random order."""
    lengths = torch.linspace(min_length * frames, frames, batch).round().clamp(1, frames).long()
    return lengths[torch.randperm(batch, generator=generator)]


def depths_for_fraction(lengths: Tensor, num_layers: int, fraction: float, generator: torch.Generator,
                        cost: Optional[Tensor] = None, draws: int = 256) -> Tensor:
    """Random per-sample depths ``[B]`` whose mean over the valid token x layers is ``fraction``.

    Depths spread evenly over ``fraction * L +- min(L / 4, room)`` (each in ``[1, L]``); of
    ``draws`` random assignments to the samples, the one whose executed fraction is closest
    to ``fraction`` is kept — weighted by tokens and, if given, by the per-sample layer
    ``cost`` ``[B]`` (attention grows with the square of the length, so long samples weigh
    more). Then the x value of the proportionality plot is f by both measures.
    """
    batch = lengths.numel()
    centre = fraction * num_layers
    spread = max(0.0, min(num_layers / 4, centre - 1, num_layers - centre))
    base = torch.linspace(centre - spread, centre + spread, batch).round().clamp(1, num_layers).long()
    weights = [w.double() / (w.double().sum() * num_layers) for w in (lengths, cost) if w is not None]
    best, best_error = base, math.inf
    for _ in range(draws):
        depth = base[torch.randperm(batch, generator=generator)]
        error = max(abs(float((depth.double() * w).sum()) - fraction) for w in weights)
        if error < best_error:
            best, best_error = depth, error
    return best


def depth_mask(depth: Tensor, num_layers: int) -> Tensor:
    """bool ``[B, L]``: layers ``0..depth[b]-1`` run."""
    return torch.arange(num_layers, device=depth.device)[None, :] < depth[:, None]


def layer_drop_mask(batch: int, num_layers: int, fraction: float, generator: torch.Generator) -> Tensor:
    """bool ``[B, L]`` per-sample random layer dropping: each sample keeps its own random
    ``round(f * L)`` layers (so the kept fraction of token x layers is exactly f, whatever
    the lengths)."""
    keep = max(1, round(fraction * num_layers))
    rank = torch.rand(batch, num_layers, generator=generator).argsort(1).argsort(1)
    return rank < keep


def padding_mask(lengths: Tensor, frames: int) -> Tensor:
    """bool ``[B, T]``, True at pads (torchaudio's ``key_padding_mask``)."""
    return ~valid_frames(lengths, frames)


def masked_forward(conformer: nn.Module, input: Tensor, lengths: Tensor, layer_mask: Tensor) -> Tensor:
    """Today's per-sample layer dropping on torchaudio's Conformer: every layer runs on the
    whole padded batch ``[B, T, D]`` and dropped samples keep their input (``torch.where``
    by the ``[B, L]`` mask)."""
    pads = padding_mask(lengths, input.shape[1])
    x = input.transpose(0, 1)
    for layer_id, layer in enumerate(conformer.conformer_layers):
        x = torch.where(layer_mask[:, layer_id].view(1, -1, 1), layer(x, pads), x)
    return x.transpose(0, 1)


def valid_mean_square(output: Tensor, lengths: Tensor) -> Tensor:
    """Training-step loss of the encoder benchmarks: mean square of ``[B, T, D]`` over
    valid frames."""
    valid = ~padding_mask(lengths, output.shape[1])
    return (output.square().sum(-1) * valid).sum() / valid.sum()


def build_conformer(config: BenchConfig, device: torch.device) -> Tuple[nn.Module, DynamicConformer]:
    """(torchaudio Conformer, DynamicConformer) with the same random weights, in eval mode."""
    import torchaudio

    model = config.model
    torch.manual_seed(config.seed)
    static = torchaudio.models.Conformer(input_dim=model.dim, num_heads=model.num_heads, ffn_dim=model.ffn_dim,
                                         num_layers=model.num_layers, depthwise_conv_kernel_size=model.kernel_size,
                                         dropout=model.dropout).to(device).eval()
    return static, DynamicConformer.from_torchaudio(static).eval()


def make_input(config: BenchConfig, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``([B, T, D] input, lengths [B])`` with lengths spread over ``min_length``..100 % of T."""
    generator = torch.Generator().manual_seed(config.seed)
    lengths = spread_lengths(config.batch, config.frames, config.min_length, generator)
    input = torch.randn(config.batch, config.frames, config.model.dim, generator=generator)
    return input.to(device), lengths.to(device)


class Workload:
    """Models and inputs of one run on one device, built on first use and shared by all
    cases (same weights, same inputs for every peer)."""

    def __init__(self, config: BenchConfig, device: torch.device) -> None:
        self.config, self.device = config, torch.device(device)

    @property
    def num_layers(self) -> int:
        return self.config.model.num_layers

    def _generator(self, salt: int, fraction: float) -> torch.Generator:
        # One stream per (use, fraction): the masks do not depend on which cases ran first.
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + salt * 1009 + round(fraction * 1000))

    @functools.cached_property
    def models(self) -> Tuple[nn.Module, DynamicConformer]:
        return build_conformer(self.config, self.device)

    @functools.cached_property
    def input(self) -> Tuple[Tensor, Tensor]:
        return make_input(self.config, self.device)

    @property
    def valid_tokens(self) -> int:
        return int(self.input[1].sum())

    @functools.lru_cache(maxsize=None)
    def depth(self, fraction: float) -> Tensor:
        """int64 ``[B]`` per-sample depths executing ``fraction`` of the token x layers."""
        lengths = self.input[1].cpu()
        cost = torch.tensor([self.models[1].layer_flops(n, n * n) for n in lengths.tolist()])
        depth = depths_for_fraction(lengths, self.num_layers, fraction, self._generator(1, fraction), cost)
        return depth.to(self.device)

    @functools.lru_cache(maxsize=None)
    def drop_mask(self, fraction: float) -> Tensor:
        """bool ``[B, L]``: each sample's random ``fraction`` of the layers."""
        mask = layer_drop_mask(self.config.batch, self.num_layers, fraction, self._generator(2, fraction))
        return mask.to(self.device)

    def token_fraction(self, layer_mask: Tensor) -> float:
        """Fraction of the valid token x layers a ``[B, L]`` mask keeps."""
        lengths = self.input[1]
        return float((layer_mask.sum(1) * lengths).sum()) / (self.valid_tokens * self.num_layers)

    @property
    def padded_fraction(self) -> float:
        """Computed token x layers of a padded full-depth pass over the valid ones."""
        return self.config.batch * self.config.frames / self.valid_tokens

    # ------------------------------------------------------------------ speech model
    @functools.cached_property
    def ctc_model(self) -> CTCModel:
        layers = self.num_layers
        torch.manual_seed(self.config.seed)
        model_config = dataclasses.replace(self.config.model, exit_depths=exit_depths(layers),
                                           blank_skip_depth=blank_skip_depth(layers))
        return CTCModel(model_config).to(self.device).eval()

    @functools.cached_property
    def speech_batch(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(features [B, 4T + 3, F], lengths [B], targets [sum S], target_lengths [B])``:
        T encoder frames after the 4x front-end, lengths spread like :attr:`input`, random
        tokens."""
        config, model = self.config, self.config.model
        generator = torch.Generator().manual_seed(config.seed + 2)
        lengths = 4 * self.input[1].cpu() + 3
        features = torch.randn(config.batch, 4 * config.frames + 3, model.num_features, generator=generator)
        target_lengths = (self.input[1].cpu() // 4).clamp_min(1)
        targets = torch.randint(1, model.vocab_size, (int(target_lengths.sum()),), generator=generator)
        return tuple(t.to(self.device) for t in (features, lengths, targets, target_lengths))

    # ------------------------------------------------------------------ ops
    @functools.cached_property
    def op_rows(self) -> Dict[str, Any]:
        """Packed rows at ``op_dim`` channels and one layer's per-sample LD route over them
        (a random half of the samples active)."""
        config, device = self.config, self.device
        generator = torch.Generator().manual_seed(config.seed + 3)
        lengths = self.input[1]
        padded = torch.randn(config.batch, config.frames, config.op_dim, generator=generator).to(device)
        packed = pack(padded, lengths)
        mask = layer_drop_mask(config.batch, self.num_layers, 0.5, generator).to(device)
        schedule = Schedule(packed.batch, self.num_layers, sample_mask=mask)
        route = schedule.routes()[0]
        return dict(padded=padded, packed=packed, schedule=schedule, route=route,
                    row_mask=mask.index_select(0, packed.batch.seq_ids).t().contiguous())
