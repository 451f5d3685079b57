"""``exits``: CTC-model inference under budgets — early exit at each fixed exit and
CTC-blank frame skipping — against the full model, front-end included."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from dynenc.methods import BlankSkipBudget, Budget, EarlyExitBudget, FullBudget, infer

from ..harness import Prepared
from ..workload import BenchConfig, Workload, blank_skip_depth, exit_depths
from .base import Builder, Case, Figure, Ratio, under_inference


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
        p_blank = model.blank_head.blank_log_prob(out.hidden[model.config.blank_skip_depth - 1]).exp()
    return float(torch.quantile(p_blank.float().cpu(), 1 - skip))


def _under_budget(make_budget: Callable[[Workload], Budget]) -> Builder:
    def build(w: Workload) -> Prepared:
        model, budget = w.ctc_model, make_budget(w)
        features, lengths = w.speech_batch[:2]
        run = under_inference(lambda: infer(model, features, lengths, budget), model)
        report = run().report
        return Prepared(run, dict(active=report.executed_fraction, computed=report.executed_fraction))

    return build


NOBODY_EXITS = "early exit, nobody exits"
#: Fractions of the frames that skip the layers after the blank-skip layer.
SKIPPED_FRAMES = (0.6, 0.8)


def fixed_exits(config: BenchConfig) -> Tuple[int, ...]:
    """The fixed exits timed: every exit of the CTC model in a full run, else the middle one."""
    exits = exit_depths(config.model.num_layers)
    return exits if config.full or len(exits) < 2 else (exits[len(exits) // 2],)


def skipped_frames(config: BenchConfig) -> Tuple[float, ...]:
    """The blank-skip budgets timed: :data:`SKIPPED_FRAMES` in a full run, else the first."""
    return SKIPPED_FRAMES if config.full else SKIPPED_FRAMES[:1]


def _blank_skip_case(skip: float) -> str:
    """The case name of blank skipping with a fraction ``skip`` of the frames skipped."""
    return f"blank skip {int(skip * 100)}%"


def _front_end(w: Workload) -> Prepared:
    """The CTC model's convolutional front-end alone: the part no budget can skip."""
    model = w.ctc_model
    features, lengths = w.speech_batch[:2]
    return Prepared(under_inference(lambda: model.embed(features, lengths), model))


def cases(config: BenchConfig) -> List[Case]:
    """Early exit at each fixed exit, CTC-blank frame skipping after layer L/2 with 60 % and
    80 % of the frames judged blank (spike window 0: with random weights the blank frames
    are scattered at random, so spike extension would keep nearly every frame). The
    front-end alone is timed too: budgets skip encoder work only. Without ``config.full``
    one fixed exit (L/2) and one blank-skip budget (60 %)."""
    layers = config.model.num_layers
    result = [Case("exits", "front-end only", "dynenc", _front_end),
              Case("exits", "full", "dynenc", _under_budget(lambda w: FullBudget()))]
    for exit_depth in fixed_exits(config):
        result.append(Case("exits", f"early exit @{exit_depth}", "dynenc",
                           _under_budget(lambda w, e=exit_depth: EarlyExitBudget(fixed_exit=e))))
    # Mean max-posterior >= 1 is never reached: every exit head runs, nobody leaves.
    result.append(Case("exits", NOBODY_EXITS, "dynenc",
                       _under_budget(lambda w: EarlyExitBudget(threshold=1.0, criterion="max_prob"))))
    if layers > 1:
        for skip in skipped_frames(config):
            result.append(Case("exits", _blank_skip_case(skip), "dynenc", _under_budget(
                lambda w, s=skip: BlankSkipBudget(threshold=_blank_threshold(w, s), spike_window=0))))
    return result


def ratios(config: BenchConfig) -> List[Ratio]:
    """Whole-model time ratios (no targets: compare with the executed fraction of the
    encoder, the ``active`` column), and the share of the front-end no budget can skip."""
    full, front_end, layers = "exits/full", "exits/front-end only", config.model.num_layers
    budgets = [Ratio("exits", f"{case.name} / full", case.key, full) for case in cases(config)[2:]
               if case.name != NOBODY_EXITS]
    # A fixed exit at layer k should cost the front-end plus k/L of the encoder (+ its head).
    proportional = [Ratio("exits", f"early exit @{k} / (front-end + {k}/{layers} encoder)", f"exits/early exit @{k}",
                          ((front_end, 1 - k / layers), (full, k / layers)), target=1.05)
                    for k in fixed_exits(config) if k < layers]
    # Blank skip: a fraction p of the frames skips the layers after K, so the encoder runs
    # s = 1 - p (1 - K / L) of its token x layers; the model should cost the front-end plus s of it.
    if layers > 1:
        kept = 1 - blank_skip_depth(layers) / layers
        for skip in skipped_frames(config):
            s = 1 - skip * kept
            name = _blank_skip_case(skip)
            proportional.append(Ratio("exits", f"{name} / (front-end + {s:.2f} encoder)", f"exits/{name}",
                                      ((front_end, 1 - s), (full, s)),
                                      target=1.05))
    return budgets + proportional + [
        Ratio("exits", f"{NOBODY_EXITS} / full", f"exits/{NOBODY_EXITS}", full, target=1.03,
              note="every exit head runs on every row, routing stays the full prefix"),
        Ratio("exits", "front-end only / full", front_end, full, note="the part of an inference that no budget skips")]


FIGURE = Figure("exits", cases, ratios)
