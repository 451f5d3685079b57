"""``dynenc bench``: dynenc against its peers, same weights, one run, ratios (installed as
``dynenc.bench``; the command line is :mod:`.cli`).

Peers (all built from one set of weights):

* ``torchaudio`` — ``torchaudio.models.Conformer`` on the padded batch (static depth);
* ``masked`` — today's per-sample layer dropping: every layer runs on every (padded) sample and
  the result is discarded by mask, ``x = torch.where(keep_b, layer(x), x)``;
* ``dynenc-reference`` — :class:`dynenc.DynamicConformer` on the plain-PyTorch reference ops;
* ``dynenc`` — the same module on the native ops (C++ on CPU, Triton on CUDA).

Every benchmark is a :class:`Case` of a :class:`Figure`, one module each under
:mod:`.figures`, registered in :data:`FIGURES` in the order they run: ``forward``
(proportionality, padding), ``peers`` (torchaudio eager / compiled / bucketed), ``roofline``
(forward and training step over their dense matmuls), ``train`` (training step, saved
activations), ``dld`` (the DLD step), ``exits`` (early-exit and blank-skip inference), ``ops``
(op micro-benchmarks, routing overhead), ``edge`` (batch-1 latency, eager and ONNX Runtime),
``foundation`` (WavLM and HuBERT against Hugging Face's and torchaudio's models; WavLM's fused
relative-position-bias attention against HF's materialised bias, time and peak memory) and
``latency`` (batch 1: every budget kind through ``methods.infer`` against ONNX Runtime on the
exported graph of the same budget; the fixed cost per call and per layer, in ms).
The default run leaves out each figure's secondary cases and extra sweep points;
``BenchConfig.full`` (:data:`FULL`, ``dynenc bench --full``) has them all, :data:`QUICK` too
at tiny sizes. The cases are defined once; ``dynenc bench`` times them and the
pytest-benchmark suites (``bench/suites/``, not part of the installed package) run the same
cases. Within a figure the cases are timed round-robin (warm-up rounds first, then
``repeats`` rounds) so that drift of a shared machine hits all peers alike; each case
reports the median. A figure's :class:`Ratio` rows turn medians into the ratios the README
quotes, each with its target (or none); a few are absolute costs in ms (metric ``"ms"``).

Modules: :mod:`.workload` (sizes, inputs, models), :mod:`.harness` (timing, machine header),
:mod:`.figures`, :mod:`.runner` (figures -> rows and ratios), :mod:`.report` (tables, JSON,
PNG), :mod:`.cli`.
"""
from .figures import FIGURES, Case, Figure, Ratio, all_cases
from .harness import Prepared, TrainStep, machine_info, measure, synchronize
from .runner import RatioResult, Row, run_benchmarks
from .workload import (FULL, QUICK, BenchConfig, Workload, build_conformer, depth_mask, depths_for_fraction,
                       layer_drop_mask, make_input, masked_forward, spread_lengths, valid_mean_square)

__all__ = [
    "FIGURES", "FULL", "QUICK", "BenchConfig", "Case", "Figure", "Prepared", "Ratio", "RatioResult", "Row", "TrainStep",
    "Workload", "all_cases", "build_conformer", "depth_mask", "depths_for_fraction", "layer_drop_mask",
    "machine_info", "make_input", "masked_forward", "measure", "run_benchmarks", "spread_lengths", "synchronize",
    "valid_mean_square",
]
