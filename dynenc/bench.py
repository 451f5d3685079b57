"""``dynenc bench``: dynenc against its peers, same weights, one run, ratios.

Peers (all built from one set of weights):

* ``torchaudio`` — ``torchaudio.models.Conformer`` on the padded batch (static depth);
* ``masked`` — today's per-sample layer dropping: every layer runs on every (padded) sample and
  the result is discarded by mask, ``x = torch.where(keep_b, layer(x), x)``;
* ``dynenc-reference`` — :class:`dynenc.DynamicConformer` on the plain-PyTorch reference ops;
* ``dynenc`` — the same module on the native ops (C++ on CPU, Triton on CUDA).

Every benchmark is a :class:`Case` of a *figure* (``forward``, ``train``, ``dld``, ``exits``,
``ops``). The cases are defined once, here; ``dynenc bench`` times them and the
pytest-benchmark suites in ``bench/`` import the same cases. Within a figure the cases are
timed round-robin (warm-up rounds first, then ``repeats`` rounds) so that drift of a shared
machine hits all peers alike; each case reports the median. A figure's :class:`Ratio` rows
turn medians into the ratios the README quotes, each with its target (or none).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynenc
from dynenc import ops, reference
from dynenc.asr import CTCModel, ModelConfig, ctc_loss, distillation_kl
from dynenc.methods import Budget, DLDObjective, infer
from dynenc.model import DynamicConformer, DynamicConformerLayer
from dynenc.routing import Schedule, pack, valid_frames

FIGURES = ("forward", "train", "dld", "exits", "ops")


# ============================================================================ configuration
@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run.

    ``frames`` is T, the longest sequence; lengths are spread evenly over
    ``[min_length * T, T]`` (shuffled). The ``ops`` figure uses ``op_dim`` channels (the
    routing-overhead target is stated at D = 256) on the same rows.
    """

    dim: int = 144
    layers: int = 8
    heads: int = 4
    ffn_mult: int = 4
    kernel: int = 15
    batch: int = 16
    frames: int = 256
    min_length: float = 0.3
    fractions: Tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    op_dim: int = 256
    vocab: int = 32
    num_features: int = 80
    repeats: int = 9  # single rounds on a 2-core CPU vary by several %; the median of 9 is steadier
    warmup: int = 1
    op_min_time: float = 0.02  # seconds per op measurement (ops repeat inside one measurement)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "heads", "ffn_mult", "kernel", "batch", "frames", "op_dim", "vocab", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.dim % self.heads or self.op_dim % self.heads:
            raise ValueError(f"--dim ({self.dim}) and the op dim ({self.op_dim}) must be divisible by --heads "
                             f"({self.heads})")
        if self.kernel % 2 == 0:
            raise ValueError(f"--kernel must be odd, got {self.kernel}")
        if not 0 < self.min_length <= 1:
            raise ValueError(f"min_length must lie in (0, 1], got {self.min_length}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or 1.0 not in self.fractions:
            raise ValueError(f"fractions must lie in (0, 1] and include 1.0, got {self.fractions}")


#: Tiny sizes for smoke runs (``--quick``) and the CI test.
QUICK = BenchConfig(dim=32, layers=4, heads=2, ffn_mult=2, kernel=5, batch=4, frames=24, op_dim=32, vocab=8,
                    num_features=16, repeats=1, warmup=0, op_min_time=0.0)


# ============================================================================ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One training step (forward + backward of ``loss_fn()``) that remembers the seconds
    its forward and backward took (``last``), and can measure saved activations."""

    def __init__(self, loss_fn: Callable[[], Tensor], modules: Sequence[nn.Module], device: torch.device) -> None:
        self.loss_fn, self.modules, self.device = loss_fn, list(modules), device
        self.last: Dict[str, float] = {}

    def _prepare(self) -> None:
        for module in self.modules:
            module.train()
            module.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self._prepare()
        start = time.perf_counter()
        loss = self.loss_fn()
        synchronize(self.device)
        middle = time.perf_counter()
        loss.backward()
        synchronize(self.device)
        self.last = {"fwd": middle - start, "bwd": time.perf_counter() - middle}

    def saved_bytes(self) -> int:
        """Bytes of the distinct storages autograd saves for backward in one forward,
        parameters excluded: the activation memory a training step holds at its peak (on
        top of weights and gradients). Measured without a backward, outside the timings."""
        self._prepare()
        params = {p.untyped_storage().data_ptr() for m in self.modules for p in m.parameters()}
        storages: Dict[int, int] = {}

        def pack_hook(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            self.loss_fn()
        return sum(storages.values())


@dataclass
class Prepared:
    """A case ready to run: ``run()`` is what gets timed; ``info`` are per-case facts
    (``active`` and ``computed`` fractions of the valid token x layers, ``saved_mb``, ...)."""

    run: Callable[[], Any]
    info: Dict[str, Any] = field(default_factory=dict)
    repeat_inside: bool = False  # micro-benchmarks: repeat run() inside one measurement


@dataclass
class Timing:
    seconds: List[float] = field(default_factory=list)  # one per measured round (per call)
    phases: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return _median(self.seconds)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _calls_per_measurement(prepared: Prepared, min_time: float, device: torch.device) -> int:
    """How often a micro-benchmark repeats inside one measurement to last ``min_time``."""
    if not prepared.repeat_inside or min_time <= 0:
        return 1
    synchronize(device)
    start = time.perf_counter()
    prepared.run()
    synchronize(device)
    return max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-7)))


def measure(prepared: Dict[str, Prepared], repeats: int, warmup: int, device: torch.device,
            min_time: float = 0.0, on_round: Optional[Callable[[str], None]] = None) -> Dict[str, Timing]:
    """Time every case ``warmup + repeats`` rounds, round-robin; keep the last ``repeats``.

    ``on_round(name)`` is called after each timed call (progress reporting).
    """
    calls = {name: _calls_per_measurement(p, min_time, device) for name, p in prepared.items()}
    timings = {name: Timing() for name in prepared}
    for round_id in range(warmup + repeats):
        for name, case in prepared.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                case.run()
            synchronize(device)
            elapsed = (time.perf_counter() - start) / calls[name]
            if round_id >= warmup:
                timings[name].seconds.append(elapsed)
                # Training steps (TrainStep) also report their forward / backward split.
                for phase, seconds in getattr(case.run, "last", {}).items():
                    timings[name].phases.setdefault(phase, []).append(seconds)
            if on_round is not None:
                on_round(name)
    return timings


# ============================================================================ inputs and peers
def spread_lengths(batch: int, frames: int, min_length: float, generator: torch.Generator) -> Tensor:
    """int64 ``[B]`` lengths spread evenly over ``[min_length * T, T]`` in random order."""
    lengths = torch.linspace(min_length * frames, frames, batch).round().clamp(1, frames).long()
    return lengths[torch.randperm(batch, generator=generator)]


def depths_for_fraction(lengths: Tensor, num_layers: int, fraction: float, generator: torch.Generator,
                        cost: Optional[Tensor] = None, draws: int = 256) -> Tensor:
    """Random per-sample depths whose mean over the valid token x layers is ``fraction``.

    Depths spread evenly over ``fraction * L +- min(L / 4, room)`` (each in ``[1, L]``); of
    ``draws`` random assignments to the samples, the one whose executed fraction is closest
    to ``fraction`` is kept — weighted by tokens and, if given, by the per-sample layer
    ``cost`` (attention grows with the square of the length, so long samples weigh more).
    Then the x value of the proportionality plot is f by both measures.
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
    """Per-sample random layer dropping: each sample keeps its own random ``round(f * L)``
    layers (so the kept fraction of token x layers is exactly f, whatever the lengths)."""
    keep = max(1, round(fraction * num_layers))
    rank = torch.rand(batch, num_layers, generator=generator).argsort(1).argsort(1)
    return rank < keep


def padding_mask(lengths: Tensor, frames: int) -> Tensor:
    """bool ``[B, T]``, True at pads (torchaudio's ``key_padding_mask``)."""
    return ~valid_frames(lengths, frames)


def masked_forward(conformer: nn.Module, input: Tensor, lengths: Tensor, layer_mask: Tensor) -> Tensor:
    """Today's per-sample layer dropping on torchaudio's Conformer: every layer runs on the
    whole padded batch and dropped samples keep their input (``torch.where`` by mask)."""
    pads = padding_mask(lengths, input.shape[1])
    x = input.transpose(0, 1)
    for layer_id, layer in enumerate(conformer.conformer_layers):
        x = torch.where(layer_mask[:, layer_id].view(1, -1, 1), layer(x, pads), x)
    return x.transpose(0, 1)


def valid_mean_square(output: Tensor, lengths: Tensor) -> Tensor:
    """Training-step loss of the encoder benchmarks: mean square over valid frames."""
    valid = ~padding_mask(lengths, output.shape[1])
    return (output.square().sum(-1) * valid).sum() / valid.sum()


def build_conformer(config: BenchConfig, device: torch.device) -> Tuple[nn.Module, DynamicConformer]:
    """(torchaudio Conformer, DynamicConformer) with the same random weights, in eval mode."""
    import torchaudio

    torch.manual_seed(config.seed)
    static = torchaudio.models.Conformer(input_dim=config.dim, num_heads=config.heads,
                                         ffn_dim=config.ffn_mult * config.dim, num_layers=config.layers,
                                         depthwise_conv_kernel_size=config.kernel).to(device).eval()
    return static, DynamicConformer.from_torchaudio(static).eval()


def make_input(config: BenchConfig, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``([B, T, D] input, lengths [B])`` with lengths spread over 30..100 % of T."""
    generator = torch.Generator().manual_seed(config.seed)
    lengths = spread_lengths(config.batch, config.frames, config.min_length, generator)
    input = torch.randn(config.batch, config.frames, config.dim, generator=generator)
    return input.to(device), lengths.to(device)


class Workload:
    """Models and inputs of one run on one device, built on first use and shared by all
    cases (same weights, same inputs for every peer)."""

    def __init__(self, config: BenchConfig, device: torch.device) -> None:
        self.config, self.device = config, torch.device(device)

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
        lengths = self.input[1].cpu()
        cost = torch.tensor([self.models[1].layer_flops(n, n * n) for n in lengths.tolist()])
        depth = depths_for_fraction(lengths, self.config.layers, fraction, self._generator(1, fraction), cost)
        return depth.to(self.device)

    @functools.lru_cache(maxsize=None)
    def drop_mask(self, fraction: float) -> Tensor:
        mask = layer_drop_mask(self.config.batch, self.config.layers, fraction, self._generator(2, fraction))
        return mask.to(self.device)

    def token_fraction(self, layer_mask: Tensor) -> float:
        """Fraction of the valid token x layers a ``[B, L]`` mask keeps."""
        lengths = self.input[1]
        return float((layer_mask.sum(1) * lengths).sum()) / (self.valid_tokens * self.config.layers)

    @property
    def padded_fraction(self) -> float:
        """Computed token x layers of a padded full-depth pass over the valid ones."""
        return self.config.batch * self.config.frames / self.valid_tokens

    # ------------------------------------------------------------------ speech model
    @functools.cached_property
    def ctc_model(self) -> CTCModel:
        config = self.config
        layers = config.layers
        exits = tuple(sorted({max(1, layers * q // 4) for q in (1, 2, 3)} - {layers}))
        torch.manual_seed(config.seed)
        model_config = ModelConfig(vocab_size=config.vocab, num_features=config.num_features, dim=config.dim,
                                   num_heads=config.heads, ffn_dim=config.ffn_mult * config.dim, num_layers=layers,
                                   kernel_size=config.kernel, dropout=0.0, exit_layers=exits,
                                   blank_skip_layer=max(1, layers // 2) if layers > 1 else 0)
        return CTCModel(model_config).to(self.device).eval()

    @functools.cached_property
    def speech_batch(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(features [B, 4T + 3, F], lengths, targets, target_lengths)``: T encoder
        frames after the 4x front-end, lengths spread like :attr:`input`, random tokens."""
        config = self.config
        generator = torch.Generator().manual_seed(config.seed + 2)
        lengths = 4 * self.input[1].cpu() + 3
        features = torch.randn(config.batch, 4 * config.frames + 3, config.num_features, generator=generator)
        target_lengths = (self.input[1].cpu() // 4).clamp_min(1)
        targets = torch.randint(1, config.vocab, (int(target_lengths.sum()),), generator=generator)
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
        mask = layer_drop_mask(config.batch, config.layers, 0.5, generator).to(device)
        schedule = Schedule(packed.batch, config.layers, sample_mask=mask)
        route = schedule.routes()[0]
        return dict(padded=padded, packed=packed, schedule=schedule, route=route,
                    row_mask=mask.index_select(0, packed.batch.seq_ids).t().contiguous())


# ============================================================================ cases and ratios
Builder = Callable[[Workload], Prepared]


@dataclass(frozen=True)
class Case:
    """One benchmark: ``build(workload)`` returns the :class:`Prepared` callable to time."""

    figure: str
    name: str
    peer: str
    build: Builder = field(compare=False)

    @property
    def key(self) -> str:
        return f"{self.figure}/{self.name}"


#: A case key, or weighted case keys ``((key, weight), ...)`` summed.
Terms = Union[str, Tuple[Tuple[str, float], ...]]


def _terms(terms: Terms) -> Tuple[Tuple[str, float], ...]:
    return ((terms, 1.0),) if isinstance(terms, str) else terms


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of case medians (each a weighted sum of cases), against
    a target.

    ``target`` is a number, a function of the prepared infos (for targets that depend on
    a measured fraction), or None (reported, no target). ``metric`` ``"time"`` compares
    medians, ``"saved"`` compares saved-activation bytes.
    """

    figure: str
    name: str
    numerator: Terms
    denominator: Terms
    target: Any = None
    metric: str = "time"
    note: str = ""


def _fmt_fraction(fraction: float) -> str:
    return f"f={fraction:.2f}"


def _inference(fn: Callable[[], Any], *modules: nn.Module) -> Callable[[], Any]:
    """``fn`` under ``torch.inference_mode`` with ``modules`` in eval mode (the training
    figure leaves them in training mode; setting the mode costs microseconds)."""

    def run() -> Any:
        for module in modules:
            module.eval()
        with torch.inference_mode():
            return fn()

    return run


def _with_backend(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with dynenc.use_backend(backend):
            return fn()

    return run


# ------------------------------------------------------------------ forward (proportionality, padding)
def _torchaudio_forward(w: Workload) -> Prepared:
    static, _ = w.models
    x, lengths = w.input
    return Prepared(_inference(lambda: static(x, lengths), static), dict(active=1.0, computed=w.padded_fraction))


def _masked_forward(fraction: float) -> Builder:
    def build(w: Workload) -> Prepared:
        static, _ = w.models
        x, lengths = w.input
        mask = depth_mask(w.depth(fraction), w.config.layers)
        return Prepared(_inference(lambda: masked_forward(static, x, lengths, mask), static),
                        dict(active=w.token_fraction(mask), computed=w.padded_fraction))

    return build


def _dynenc_forward(fraction: float, backend: str = "native", drop: bool = False) -> Builder:
    """dynenc at active fraction f: per-sample depths (sorted prefix routes), or per-sample
    random layer subsets (``drop``: gather/scatter routes)."""

    def build(w: Workload) -> Prepared:
        _, dynamic = w.models
        x, lengths = w.input
        if fraction >= 1:
            routing = {}
        elif drop:
            routing = dict(layer_mask=w.drop_mask(fraction))
        else:
            routing = dict(depth=w.depth(fraction))
        run = _with_backend(backend, _inference(lambda: dynamic(x, lengths, **routing), dynamic))
        with dynenc.use_backend(backend):
            report = _inference(lambda: dynamic(x, lengths, return_report=True, **routing).report, dynamic)()
            full = _inference(lambda: dynamic(x, lengths, return_report=True).report, dynamic)()
        return Prepared(run, dict(active=report.executed_fraction, computed=report.executed_fraction,
                                  flops=report.flops / full.flops))

    return build


def forward_cases(config: BenchConfig) -> List[Case]:
    """Inference forward of the encoder on the spread-length batch: every peer, dynenc at
    every active fraction (per-sample random depths), plus per-sample LD masks at f = 0.5 and
    one reference-backend row (the plain-PyTorch ops are slow)."""
    cases = [Case("forward", "torchaudio", "torchaudio", _torchaudio_forward)]
    for f in config.fractions:
        cases.append(Case("forward", f"masked {_fmt_fraction(f)}", "masked", _masked_forward(f)))
    for f in config.fractions:
        cases.append(Case("forward", f"dynenc {_fmt_fraction(f)}", "dynenc", _dynenc_forward(f)))
    cases.append(Case("forward", "dynenc LD f=0.50", "dynenc", _dynenc_forward(0.5, drop=True)))
    cases.append(Case("forward", "dynenc-reference f=1.00", "dynenc-reference", _dynenc_forward(1.0, "reference")))
    return cases


def forward_ratios(config: BenchConfig) -> List[Ratio]:
    full = "forward/dynenc f=1.00"

    def proportional(key: str) -> Callable[[Dict[str, Dict[str, Any]]], float]:
        return lambda infos: infos[key]["active"] + 0.03  # f = the executed token x layer fraction

    ratios = [Ratio("proportionality", f"dynenc {_fmt_fraction(f)} / dynenc full",
                    f"forward/dynenc {_fmt_fraction(f)}", full,
                    target=proportional(f"forward/dynenc {_fmt_fraction(f)}"), note="per-sample random depths")
              for f in sorted(config.fractions, reverse=True) if f < 1]
    ratios += [
        Ratio("proportionality", "dynenc LD f=0.50 / dynenc full", "forward/dynenc LD f=0.50", full,
              target=proportional("forward/dynenc LD f=0.50"),
              note="per-sample random layer subsets (gather/scatter routes)"),
        Ratio("padding", "dynenc full / torchaudio", full, "forward/torchaudio", target=0.70),
        Ratio("padding", "dynenc f=0.50 / torchaudio", "forward/dynenc f=0.50", "forward/torchaudio",
              target=0.38),
        Ratio("padding", "masked f=0.50 / torchaudio", "forward/masked f=0.50", "forward/torchaudio",
              note="today's practice saves nothing"),
        Ratio("backends", "dynenc-reference / dynenc (native)", "forward/dynenc-reference f=1.00", full),
    ]
    return ratios


# ------------------------------------------------------------------ training step
def _train_case(peer: str, fraction: float) -> Builder:
    def build(w: Workload) -> Prepared:
        static, dynamic = w.models
        x, lengths = w.input
        mask = w.drop_mask(fraction)
        if peer == "torchaudio":
            module, loss = static, lambda: valid_mean_square(static(x, lengths)[0], lengths)
        elif peer == "masked":
            module, loss = static, lambda: valid_mean_square(masked_forward(static, x, lengths, mask), lengths)
        else:
            routing = {} if fraction >= 1 else dict(layer_mask=mask)
            module, loss = dynamic, lambda: valid_mean_square(dynamic(x, lengths, **routing)[0], lengths)
        step = TrainStep(loss, [module], w.device)
        active = 1.0 if fraction >= 1 else w.token_fraction(mask)
        computed = active if peer == "dynenc" else w.padded_fraction
        return Prepared(step, dict(active=active, computed=computed, saved_mb=step.saved_bytes() / 2**20))

    return build


def train_cases(config: BenchConfig) -> List[Case]:
    """One training step (forward + backward, no optimizer) with per-sample layer dropping
    (each sample its own random half of the layers) against full depth."""
    return [
        Case("train", "torchaudio full", "torchaudio", _train_case("torchaudio", 1.0)),
        Case("train", "masked LD f=0.50", "masked", _train_case("masked", 0.5)),
        Case("train", "dynenc full", "dynenc", _train_case("dynenc", 1.0)),
        Case("train", "dynenc LD f=0.50", "dynenc", _train_case("dynenc", 0.5)),
    ]


def train_ratios(config: BenchConfig) -> List[Ratio]:
    ld, full = "train/dynenc LD f=0.50", "train/dynenc full"
    return [
        Ratio("train", "dynenc LD f=0.50 step / dynenc full step", ld, full, target=0.60),
        Ratio("train", "dynenc LD f=0.50 saved activations / full", ld, full, target=0.60, metric="saved",
              note="bytes autograd saves for backward (distinct storages, parameters excluded)"),
        Ratio("train", "dynenc full step / torchaudio full step", full, "train/torchaudio full"),
        Ratio("train", "masked LD f=0.50 step / torchaudio full step", "train/masked LD f=0.50",
              "train/torchaudio full"),
    ]


# ------------------------------------------------------------------ DLD
def _teacher_and_full_student_loss(model: CTCModel, batch) -> Tensor:
    """The DLD baseline: the same teacher forward and losses, full-depth student."""
    features, lengths, targets, target_lengths = batch
    x, x_lengths = model.embed(features, lengths)
    with torch.no_grad():
        teacher_log_probs, _, _ = model.encode(x, x_lengths)
    student_log_probs, _, _ = model.encode(x, x_lengths)
    return (ctc_loss(student_log_probs, x_lengths, targets, target_lengths)
            + distillation_kl(teacher_log_probs, student_log_probs, x_lengths))


def _dld_case(dropping: bool) -> Builder:
    def build(w: Workload) -> Prepared:
        model, batch = w.ctc_model, w.speech_batch
        if dropping:
            objective = DLDObjective("self", drop_prob=0.5)

            def loss() -> Tensor:
                torch.manual_seed(w.config.seed)  # the same gates every round: a fixed workload
                return objective(model, batch)[0]
        else:
            def loss() -> Tensor:
                return _teacher_and_full_student_loss(model, batch)
        step = TrainStep(loss, [model], w.device)
        return Prepared(step, dict(saved_mb=step.saved_bytes() / 2**20))

    return build


def dld_cases(config: BenchConfig) -> List[Case]:
    """DLD training step of the CTC model (self-teacher full-depth forward + student with
    per-sample Bernoulli(0.5) gates) against teacher forward + full-depth student step."""
    return [
        Case("dld", "teacher fwd + full student step", "dynenc", _dld_case(False)),
        Case("dld", "DLD step (p=0.5)", "dynenc", _dld_case(True)),
    ]


def dld_ratios(config: BenchConfig) -> List[Ratio]:
    return [Ratio("dld", "DLD step / (teacher fwd + full student step)", "dld/DLD step (p=0.5)",
                  "dld/teacher fwd + full student step", target=0.67)]


# ------------------------------------------------------------------ early exit, blank skip
def _blank_threshold(w: Workload, skip: float) -> float:
    """tau such that a fraction ``skip`` of the frames has p(blank) > tau at layer K.

    With random weights the blank head's scores have no meaning, so budgets are set by the
    quantiles of its scores (the work skipped is what matters here)."""
    model = w.ctc_model
    features, lengths = w.speech_batch[:2]
    with torch.inference_mode():
        model.eval()
        x, x_lengths = model.embed(features, lengths)
        out = model.encoder(x, x_lengths, return_hidden=True)
        p_blank = model.blank_head.blank_log_prob(out.hidden[model.config.blank_skip_layer - 1]).exp()
    return float(torch.quantile(p_blank.float().cpu(), 1 - skip))


def _exit_case(make_budget: Callable[[Workload], Budget]) -> Builder:
    def build(w: Workload) -> Prepared:
        model, budget = w.ctc_model, make_budget(w)
        features, lengths = w.speech_batch[:2]
        run = _inference(lambda: infer(model, features, lengths, budget), model)
        report = run().report
        return Prepared(run, dict(active=report.executed_fraction, computed=report.executed_fraction))

    return build


def _front_end(w: Workload) -> Prepared:
    """The CTC model's convolutional front-end alone: the part no budget can skip."""
    model = w.ctc_model
    features, lengths = w.speech_batch[:2]
    return Prepared(_inference(lambda: model.embed(features, lengths), model))


def exit_cases(config: BenchConfig) -> List[Case]:
    """CTC-model inference under budgets: early exit at each fixed exit, CTC-blank frame
    skipping after layer L/2 with 60 % and 80 % of the frames judged blank (spike window 0:
    with random weights the blank frames are scattered at random, so spike extension would
    keep nearly every frame). The front-end alone is timed too: budgets skip encoder work only."""
    layers = config.layers
    cases = [Case("exits", "front-end only", "dynenc", _front_end),
             Case("exits", "full", "dynenc", _exit_case(lambda w: Budget("full")))]
    for exit_layer in sorted({max(1, layers * q // 4) for q in (1, 2, 3)} - {layers}):
        cases.append(Case("exits", f"early exit @{exit_layer}", "dynenc",
                          _exit_case(lambda w, e=exit_layer: Budget("early_exit", fixed_exit=e))))
    if layers > 1:
        for skip in (0.6, 0.8):
            cases.append(Case("exits", f"blank skip {int(skip * 100)}%", "dynenc", _exit_case(
                lambda w, s=skip: Budget("blank_skip", blank_threshold=_blank_threshold(w, s), spike_window=0))))
    return cases


def exit_ratios(config: BenchConfig) -> List[Ratio]:
    """Whole-model time ratios (no targets: compare with the executed fraction of the
    encoder, the ``active`` column), and the share of the front-end no budget can skip."""
    full = "exits/full"
    ratios = [Ratio("exits", f"{case.name} / full", case.key, full) for case in exit_cases(config)[2:]]
    return ratios + [Ratio("exits", "front-end only / full", "exits/front-end only", full,
                           note="the part of an inference that no budget skips")]


# ------------------------------------------------------------------ op micro-benchmarks
def _dwconv_inputs(w: Workload):
    rows = w.op_rows["packed"]
    channels = w.config.op_dim
    generator = torch.Generator().manual_seed(w.config.seed + 4)
    weight = torch.randn(channels, w.config.kernel, generator=generator).to(w.device)
    bias = torch.randn(channels, generator=generator).to(w.device)
    return rows, weight, bias


def _dwconv_padded(input: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """torchaudio's depthwise conv: over the padded ``[B, C, T]`` batch."""
    return F.conv1d(input, weight.unsqueeze(1), bias, padding=(weight.shape[1] - 1) // 2, groups=weight.shape[0])


def _dwconv_per_sequence(x: Tensor, bounds: Sequence[int], weight: Tensor, bias: Tensor) -> Tensor:
    """Packed rows, one ``F.conv1d`` per sequence (host-side bounds given)."""
    return torch.cat([_dwconv_padded(x[start:end].t().unsqueeze(0), weight, bias)[0].t()
                      for start, end in zip(bounds[:-1], bounds[1:])])


def _attention_inputs(w: Workload):
    """q, k, v ``[N, H, Dh]`` packed and ``[B, H, T, Dh]`` padded, with the key mask."""
    packed, padded = w.op_rows["packed"], w.op_rows["padded"]
    heads = w.config.heads
    q, k, v = (packed.x.view(packed.x.shape[0], heads, -1).roll(shift, 2).contiguous() for shift in (0, 1, 2))
    dense = [packed.unpack(t).transpose(1, 2).contiguous() for t in (q, k, v)]
    keep = ~padding_mask(w.input[1], padded.shape[1])
    return packed, (q, k, v), dense, keep[:, None, None, :]


def _op(fn: Callable[[Workload], Callable[[], Any]]) -> Builder:
    return lambda w: Prepared(_inference(fn(w)), repeat_inside=True)


def _op_layer(w: Workload) -> Callable[[], Any]:
    """One D = op_dim Conformer layer on the active rows of the route."""
    config = w.config
    torch.manual_seed(config.seed)
    layer = DynamicConformerLayer(config.op_dim, config.ffn_mult * config.op_dim, config.heads,
                                  config.kernel).to(w.device).eval()
    rows, route = w.op_rows["packed"], w.op_rows["route"]
    active = rows.x.index_select(0, route.index)
    return lambda: layer(active, route.batch)


def _gated_scatter(native: bool) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        x, route = w.op_rows["packed"].x, w.op_rows["route"]
        y = torch.randn(route.num_rows, x.shape[1], generator=torch.Generator().manual_seed(5)).to(w.device)
        gate = torch.rand(route.num_rows, generator=torch.Generator().manual_seed(6)).to(w.device)
        impl = ops.gated_residual_scatter if native else reference.gated_residual_scatter
        return lambda: impl(x, y, gate, route.index)

    return _op(make)


def _gather(native: bool) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        x, index = w.op_rows["packed"].x, w.op_rows["route"].index
        impl = ops.gather_rows if native else reference.gather_rows  # reference: x.index_select(0, index)
        return lambda: impl(x, index)

    return _op(make)


def _dwconv(kind: str) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        packed, weight, bias = _dwconv_inputs(w)
        if kind == "native":
            return lambda: ops.varlen_dwconv1d(packed.x, packed.batch.cu_seqlens, weight, bias)
        if kind == "per-sequence":
            bounds = packed.batch.cu_seqlens.tolist()
            return lambda: _dwconv_per_sequence(packed.x, bounds, weight, bias)
        padded = w.op_rows["padded"].transpose(1, 2).contiguous()
        return lambda: _dwconv_padded(padded, weight, bias)

    return _op(make)


def _attention(kind: str) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        packed, (q, k, v), dense, keep = _attention_inputs(w)
        batch = packed.batch
        if kind == "native":
            return lambda: ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)
        if kind == "padded":
            return lambda: F.scaled_dot_product_attention(*dense, attn_mask=keep)
        bounds = batch.cu_seqlens.tolist()
        return lambda: torch.cat([
            F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])])

    return _op(make)


def _plan(kind: str) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        rows = w.op_rows
        cu_seqlens = rows["packed"].batch.cu_seqlens
        if kind == "routes":  # the whole routing step of a forward: plan + per-layer sub-batches
            return rows["schedule"].routes
        impl = ops.build_plan if kind == "native" else reference.build_plan
        return lambda: impl(rows["row_mask"], cu_seqlens)

    return _op(make)


#: op -> (implementation label, builder); the first implementation is the native op, the
#: others the eager torch compositions it replaces.
OPS: Dict[str, Tuple[Tuple[str, Builder], ...]] = {
    "gated scatter": (("native", _gated_scatter(True)),
                      ("eager clone+index_select+index_copy", _gated_scatter(False))),
    "gather": (("native", _gather(True)), ("eager index_select", _gather(False))),
    "dwconv": (("native", _dwconv("native")), ("eager per-sequence conv1d", _dwconv("per-sequence")),
               ("eager padded conv1d", _dwconv("padded"))),
    "attention": (("native", _attention("native")), ("eager padded SDPA", _attention("padded")),
                  ("eager per-sequence SDPA", _attention("per-sequence"))),
    "plan": (("native", _plan("native")), ("eager reference", _plan("reference"))),
}
ROUTES, LAYER = "routes (plan + sub-batches, all layers)", "layer"


def op_cases(config: BenchConfig) -> List[Case]:
    """Each native op against the eager torch compositions it replaces, on the packed rows
    of the benchmark batch at ``op_dim`` channels and one per-sample LD layer route (a
    random half of the samples); plus the routing step and one Conformer layer on those
    rows for the routing overhead."""
    cases = [Case("ops", f"{op} {impl}", "dynenc" if impl == "native" else "eager", build)
             for op, impls in OPS.items() for impl, build in impls]
    return cases + [Case("ops", ROUTES, "dynenc", _plan("routes")), Case("ops", LAYER, "dynenc", _op(_op_layer))]


def op_ratios(config: BenchConfig) -> List[Ratio]:
    ratios = [Ratio("ops", f"{op}: native / {impl}", f"ops/{op} native", f"ops/{op} {impl}")
              for op, impls in OPS.items() for impl, _ in impls[1:]]
    overhead = ((f"ops/{ROUTES}", 1.0 / config.layers), ("ops/gather native", 1.0), ("ops/gated scatter native", 1.0))
    ratios.append(Ratio("ops", f"routing overhead / layer (D={config.op_dim})", overhead, f"ops/{LAYER}",
                        target=0.03, note="(routes / L + gather + gated scatter) of one layer over the layer itself"))
    return ratios


CASES: Dict[str, Callable[[BenchConfig], List[Case]]] = {
    "forward": forward_cases, "train": train_cases, "dld": dld_cases, "exits": exit_cases, "ops": op_cases}
RATIOS: Dict[str, Callable[[BenchConfig], List[Ratio]]] = {
    "forward": forward_ratios, "train": train_ratios, "dld": dld_ratios, "exits": exit_ratios, "ops": op_ratios}


def all_cases(config: BenchConfig, figures: Iterable[str] = FIGURES) -> List[Case]:
    return [case for figure in figures for case in CASES[figure](config)]


# ============================================================================ machine header
def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_busy(seconds: float = 0.5) -> Optional[float]:
    """Fraction of all CPUs' time spent busy over ``seconds`` (Linux ``/proc/stat``).

    Sampled while this process is idle, it measures the other processes: unlike the load
    average it does not lag behind by a minute."""

    def sample() -> Tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((busy1 - busy0) / max(total1 - total0, 1), 3)


def machine_info() -> Dict[str, Any]:
    """CPU model and threads, GPU if any, library versions, dynenc commit."""
    import torchaudio

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpu_busy_before": _cpu_busy(),
        "load_avg_1m": _load_average(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "triton": triton_version,
        "dynenc": dynenc.__version__,
        "dynenc_commit": _git_commit(),
    }


# ============================================================================ running
@dataclass
class Row:
    device: str
    figure: str
    case: str
    peer: str
    median_ms: float
    times_ms: List[float]
    tokens_per_s: Optional[float]
    phases_ms: Dict[str, float]
    info: Dict[str, Any]


@dataclass
class RatioResult:
    device: str
    figure: str
    name: str
    measured: float
    target: Optional[float]
    met: Optional[bool]
    note: str


def evaluate(ratios: Sequence[Ratio], rows: Dict[str, Row], device: str) -> List[RatioResult]:
    """Medians (or saved bytes) -> ratios against their targets; ratios over cases that
    were not run are left out."""
    results = []
    infos = {key: row.info for key, row in rows.items()}
    for ratio in ratios:
        numerator, denominator = _terms(ratio.numerator), _terms(ratio.denominator)
        if not all(key in rows for key, _ in numerator + denominator):
            continue

        def value(terms: Tuple[Tuple[str, float], ...]) -> float:
            metric = (lambda r: r.info["saved_mb"]) if ratio.metric == "saved" else (lambda r: r.median_ms)
            return sum(weight * metric(rows[key]) for key, weight in terms)

        measured = value(numerator) / value(denominator)
        target = ratio.target(infos) if callable(ratio.target) else ratio.target
        met = None if target is None else bool(measured <= target)
        results.append(RatioResult(device, ratio.figure, ratio.name, measured, target, met, ratio.note))
    return results


def run_figure(figure: str, config: BenchConfig, workload: Workload, progress=None) -> Dict[str, Row]:
    """Prepare and time every case of ``figure``; rows keyed by case key."""
    cases = CASES[figure](config)
    prepared = {}
    for case in cases:
        if progress is not None:
            progress.set_postfix_str(f"{workload.device.type} {case.key} (setup)")
        prepared[case.key] = case.build(workload)
    rounds = config.warmup + config.repeats

    def on_round(key: str) -> None:
        if progress is not None:  # n counts cases: one timed round of a case is 1 / rounds of it
            progress.set_postfix_str(f"{workload.device.type} {key}", refresh=False)
            progress.n = (round(progress.n * rounds) + 1) / rounds  # recomputed: float sums would drift
            progress.refresh()

    timings = measure(prepared, config.repeats, config.warmup, workload.device,
                      config.op_min_time if figure == "ops" else 0.0, on_round)
    rows = {}
    for case in cases:
        timing = timings[case.key]
        median = timing.median
        per_token = figure in ("forward", "train", "dld", "exits")
        rows[case.key] = Row(
            device=workload.device.type, figure=figure, case=case.name, peer=case.peer, median_ms=median * 1e3,
            times_ms=[t * 1e3 for t in timing.seconds],
            tokens_per_s=workload.valid_tokens / median if per_token and median > 0 else None,
            phases_ms={phase: _median(values) * 1e3 for phase, values in timing.phases.items()},
            info=prepared[case.key].info)
    return rows


def run_benchmarks(config: BenchConfig, figures: Sequence[str], devices: Sequence[str], show_progress: bool = True):
    """Every figure on every device; returns ``(rows, ratio results)``."""
    from tqdm.auto import tqdm

    total = len(devices) * len(all_cases(config, figures))
    rows: List[Row] = []
    results: List[RatioResult] = []
    with tqdm(total=total, desc="dynenc bench", unit="case", disable=not show_progress,
              bar_format="{l_bar}{bar}| {n:.1f}/{total} cases [{elapsed}<{remaining}{postfix}]") as progress:
        for device in devices:
            workload = Workload(config, torch.device(device))
            for figure in figures:
                figure_rows = run_figure(figure, config, workload, progress)
                rows.extend(figure_rows.values())
                results.extend(evaluate(RATIOS[figure](config), figure_rows, device))
    return rows, results


# ============================================================================ output
def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]

    def line(cells: Sequence[str]) -> str:  # two label columns left-aligned, numbers right-aligned
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def format_rows(rows: Sequence[Row]) -> str:
    body = []
    for row in rows:
        info = row.info
        phases = " / ".join(f"{row.phases_ms[p]:.1f}" for p in ("fwd", "bwd") if p in row.phases_ms)
        body.append([
            f"{row.device}:{row.figure}", row.case, f"{row.median_ms:.3f}" if row.median_ms < 10 else f"{row.median_ms:.1f}",
            f"{row.tokens_per_s:,.0f}" if row.tokens_per_s else "",
            *(f"{info[key]:.2f}" if key in info else "" for key in ("active", "flops", "computed")),
            phases, f"{info['saved_mb']:.1f}" if "saved_mb" in info else ""])
    return _table(["figure", "case", "median ms", "tokens/s", "active", "flops", "computed", "fwd / bwd ms", "saved MB"],
                  body)


def format_results(results: Sequence[RatioResult]) -> str:
    body = [[f"{r.device}:{r.figure}", r.name, f"{r.measured:.3f}", "" if r.target is None else f"<= {r.target:.2f}",
             {True: "met", False: "MISSED", None: "-"}[r.met]] for r in results]
    return _table(["figure", "ratio", "measured", "target", ""], body)


def format_machine(machine: Dict[str, Any]) -> str:
    busy = machine["cpu_busy_before"]
    return (f"CPU: {machine['cpu']} ({machine['cpu_count']} cores, torch threads {machine['torch_threads']}; "
            f"busy before the run {'?' if busy is None else f'{busy:.0%}'}, load {machine['load_avg_1m']})  "
            f"GPU: {machine['gpu'] or 'none'}\n"
            f"torch {machine['torch']}  torchaudio {machine['torchaudio']}  triton {machine['triton']}  "
            f"dynenc {machine['dynenc']} ({machine['dynenc_commit']})  python {machine['python']}")


PEER_COLOURS = {"torchaudio": "C3", "masked": "C1", "dynenc-reference": "C4", "dynenc": "C0", "eager": "C7"}


def _plot_proportionality(ax, forward: List[Row]) -> None:
    for peer, style in (("dynenc", "o-"), ("masked", "s--")):
        points = sorted((r.info["active"], r.median_ms) for r in forward
                        if r.peer == peer and "LD" not in r.case and "active" in r.info)
        if points:
            ax.plot(*zip(*points), style, color=PEER_COLOURS[peer], label=peer)
    for r in forward:
        if r.case == "dynenc f=1.00":
            ax.plot([0, 1], [0, r.median_ms], ":", color="gray", label="ideal (f x full)")
        if r.peer == "torchaudio":
            ax.axhline(r.median_ms, color=PEER_COLOURS["torchaudio"], label="torchaudio (static)")
    ax.set(title="forward time vs active fraction", xlabel="executed fraction of valid token x layers", ylabel="ms",
           xlim=(0, 1.05))
    ax.legend(fontsize=8)


def _plot_bars(ax, data: List[Row], title: str) -> None:
    """Median times; forward and backward stacked for training steps; saved MB noted."""
    labels = [r.case for r in data]
    if all("fwd" in r.phases_ms for r in data):
        fwd = [r.phases_ms["fwd"] for r in data]
        ax.barh(labels, fwd, label="forward")
        ax.barh(labels, [r.phases_ms["bwd"] for r in data], left=fwd, label="backward")
        ax.legend(fontsize=8)
    else:
        ax.barh(labels, [r.median_ms for r in data], color=[PEER_COLOURS.get(r.peer, "C7") for r in data])
    for i, r in enumerate(data):
        extra = f"  {r.info['saved_mb']:.0f} MB saved" if "saved_mb" in r.info else ""
        end = sum(r.phases_ms.values()) if r.phases_ms else r.median_ms
        ax.text(end, i, f" {r.median_ms:.0f} ms{extra}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set(title=title, xlabel="ms")
    ax.margins(x=0.35)


def _plot_exits(ax, exits: List[Row]) -> None:
    times = {r.case: r.median_ms for r in exits}
    full, front = times["full"], times.get("front-end only", 0.0)
    top = 1.0
    for r in exits:
        if "active" in r.info:
            ratio = r.median_ms / full
            top = max(top, ratio)
            ax.plot(r.info["active"], ratio, "o", color="C0")
            ax.annotate(f" {r.case}", (r.info["active"], ratio), fontsize=7)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="proportional")
    if front:
        ax.plot([0, 1], [front / full, 1], "--", color="gray", lw=0.8, label="front-end + proportional encoder")
    ax.legend(fontsize=8, loc="lower right")
    ax.set(title="inference budgets (CTC model, front-end included)", xlabel="executed fraction of the encoder",
           ylabel="time / full", xlim=(0, 1.1), ylim=(0, top * 1.1))


def _plot_ops(ax, op_results: List[RatioResult]) -> None:
    labels = [textwrap.fill(r.name, 34) for r in op_results]
    ax.barh(labels, [r.measured for r in op_results], color=["C2" if r.met is not False else "C3" for r in op_results])
    ax.axvline(1, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=6)
    for i, r in enumerate(op_results):
        ax.text(r.measured, i, f" {r.measured:.3g}", va="center", fontsize=7)
    ax.set(title="ops: native / eager time; routing overhead / layer", xlabel="time ratio (lower is better)")


def plot(rows: Sequence[Row], results: Sequence[RatioResult], device: str, path: Path, title: str) -> None:
    """One PNG per device: forward time vs active fraction, padding, training, DLD,
    inference budgets, op ratios (panels of figures that did not run say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_figure: Dict[str, List[Row]] = {}
    for row in rows:
        if row.device == device:
            by_figure.setdefault(row.figure, []).append(row)
    op_results = [r for r in results if r.device == device and r.figure == "ops"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    fig.suptitle(title, fontsize=9)
    panels = [
        ("forward", lambda ax: _plot_proportionality(ax, by_figure["forward"])),
        ("forward", lambda ax: _plot_bars(ax, by_figure["forward"], "forward (padded peers vs packed dynenc)")),
        ("train", lambda ax: _plot_bars(ax, by_figure["train"], "training step (fwd + bwd)")),
        ("dld", lambda ax: _plot_bars(ax, by_figure["dld"], "DLD step vs teacher fwd + full student step")),
        ("exits", lambda ax: _plot_exits(ax, by_figure["exits"])),
        ("ops", lambda ax: _plot_ops(ax, op_results)),
    ]
    for ax, (figure, draw) in zip(axes.flat, panels):
        if figure in by_figure:
            draw(ax)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{figure}: not run", ha="center", va="center", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: Path, config: BenchConfig, machine: Dict[str, Any], rows: Sequence[Row],
                  results: Sequence[RatioResult], devices: Sequence[str], wall_s: float) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json"}
    payload = {
        "machine": machine,
        "config": dataclasses.asdict(config),
        "devices": list(devices),
        "wall_s": wall_s,
        "notes": {
            "timing": "median over repeats after warm-up; cases of a figure timed round-robin; forward-only cases "
                      "under torch.inference_mode",
            "active": "fraction of the valid token x layers the outputs depend on",
            "flops": "estimated FLOPs executed over those of the full-depth packed forward",
            "computed": "token x layers computed over the valid token x layers (padding and discarded work > 1)",
            "saved_mb": "bytes of the distinct storages autograd saves for backward in one forward (parameters "
                        "excluded): the activation memory of a training step",
            "tokens_per_s": "valid input frames per second",
        },
        "rows": [dataclasses.asdict(r) for r in rows],
        "ratios": [dataclasses.asdict(r) for r in results],
    }
    paths["json"].write_text(json.dumps(payload, indent=2))
    title = format_machine(machine)
    for device in devices:
        paths[f"png_{device}"] = out_dir / f"bench_{device}.png"
        plot(rows, results, device, paths[f"png_{device}"], title)
    return paths


# ============================================================================ CLI
_SIZE_FLAGS = ("dim", "layers", "heads", "ffn_mult", "kernel", "batch", "frames", "op_dim", "repeats", "warmup")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    sizes = parser.add_argument_group("sizes (defaults: the embedded ~2-3 minute run; --quick: tiny)")
    for name in _SIZE_FLAGS:
        sizes.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                           help=f"default {getattr(defaults, name)} (quick {getattr(QUICK, name)})")
    sizes.add_argument("--fractions", type=float, nargs="+", default=None,
                       help=f"active fractions for proportionality (default {' '.join(map(str, defaults.fractions))})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every case in seconds")
    parser.add_argument("--modes", nargs="+", choices=FIGURES, default=list(FIGURES), metavar="MODE",
                        help=f"figures to run (default all: {' '.join(FIGURES)})")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices (default: cpu, plus cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="output directory (default out/bench)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = QUICK if args.quick else BenchConfig()
    changes = {name: getattr(args, name) for name in _SIZE_FLAGS if getattr(args, name) is not None}
    if args.fractions is not None:
        changes["fractions"] = tuple(sorted(set(args.fractions) | {1.0}, reverse=True))
    return dataclasses.replace(base, **changes)


def _devices(requested: Optional[Sequence[str]]) -> List[str]:
    if requested is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in requested:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--devices: {device!r} requested but CUDA is not available")
        if torch.device(device).type not in ("cpu", "cuda"):
            raise ValueError(f"--devices must be cpu or cuda devices, got {device!r}")
    return list(requested)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    devices = _devices(args.devices)
    figures = [f for f in FIGURES if f in args.modes]
    machine = machine_info()
    print(format_machine(machine), flush=True)
    busy = machine["cpu_busy_before"]
    if busy is not None and busy > 0.2:  # others take cores from the worker threads, which then wait on each other
        print(f"warning: other processes kept the CPUs {busy:.0%} busy before the run: timings will be noisy",
              flush=True)
    start = time.perf_counter()
    rows, results = run_benchmarks(config, figures, devices, show_progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    machine["load_avg_1m_after"] = _load_average()  # includes this run's own threads
    paths = write_outputs(args.out, config, machine, rows, results, devices, wall_s)
    print()
    print(f"D={config.dim} L={config.layers} heads={config.heads} ffn={config.ffn_mult * config.dim} "
          f"kernel={config.kernel} B={config.batch} T={config.frames} (lengths {config.min_length:.0%}..100%) "
          f"op D={config.op_dim}; median of {config.repeats} after {config.warmup} warm-up")
    print(format_rows(rows))
    print()
    print(format_results(results))
    print(f"\nwall time {wall_s:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0
