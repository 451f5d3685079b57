"""A plan's ``results.md`` and ``wer_vs_compute.png`` from its ``results.json`` (default the
current plan's, ``results/v3/``).

A pure function of the JSON (no model code): it can be regenerated at any time, also while
runs are still missing. The seed papers' claims are data (:data:`CLAIMS`); each gets a verdict
by one rule (:func:`verdict`, stated in the markdown) from the multi-seed results.

    python -m recipes.synthetic_speech report [--results R/results.json] [--out R/results.md]
                                              [--figure R/wer_vs_compute.png]

results.json: ``{"corpus": {...free-form statistics...}, "runs": [{"method", "protocol", "seed",
"epochs", "init", "lr", "train_seconds", "epoch_seconds", "dev_wer_per_epoch", "best_epoch",
"budgets": [{"budget", "wer", "executed", "rtf", "rtf_1thread"?, "speedup"?, ...}],
"timing"?: {"scheme", "utterances", "repeats"}}], "plan"?: {...}}``; fields beyond a budget's
``budget``, ``wer``, ``executed`` and ``rtf`` may be missing or null.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dynenc.fileio import atomic_write

from . import CURRENT_RESULTS

#: Budget metrics aggregated over seeds (the per-budget table and the figure use them).
BUDGET_METRICS = ("wer", "executed", "rtf", "rtf_1thread", "speedup", "blank_fraction", "skipped_frame_fraction",
                  "mean_exit_depth", "distinct_masks", "top_mask_share")
#: Required numeric fields of every budget row.
REQUIRED_BUDGET_FIELDS = ("wer", "executed", "rtf")
#: Fewer seeds than this on either side of a claim: no verdict.
MIN_SEEDS = 3
#: Layers assumed only when no budget label names a depth yet (no runs): the recipe's model.
DEFAULT_LAYERS = 6
#: Table order of the protocols; others follow in the order they appear.
PROTOCOL_ORDER = ("static", "static_ft", "layer_drop", "layer_drop_small_lr", "dld", "selector",
                  "early_exit_ft", "early_exit_scratch", "blank_skip")

# Seed papers (arXiv ids).
DLD, SELECTOR, BLANK_SKIP, EARLY_EXIT = "2601.16117", "2507.07954", "2401.02046", "2309.09546"

#: The early-exit paper's WER per exit depth (12 layers, LibriSpeech-960, from scratch, test-clean).
PAPER_EXIT_WER = {2: 31.0, 4: 11.7, 6: 7.1, 8: 5.8, 10: 5.3, 12: 5.1}

DEVIATIONS = (
    "A 6-layer, d = 144 Conformer instead of the papers' 12 or more layers.",
    "Synthetic multi-engine speech (espeak-ng, flite, festival voices; held-out test voices) "
    "instead of LibriSpeech.",
    "DLD and LD are both fine-tuned from the same static model (the DLD paper does not state its "
    "starting point).",
    "The selector takes its budget k as an input (our choice, so one selector serves every k) and "
    "is trained on the LD backbone.",
    "Blank skipping is fine-tuned from the static model rather than trained from scratch, with "
    "skipping active (tau = 0.9) so the upper layers train on the compacted sequences. Its blank "
    "head reads layer L/2, so only layers L/2+1..L can be skipped, and spike extension (w = 1) "
    "keeps every blank frame next to a non-blank one: the skipped % column is far below the "
    "blank % column. With 40 ms frames and 64 BPE units blank frames do not dominate as in the "
    "paper's regime (the blank % column), and the compute skipping saves (1 - executed) is to be "
    "read against the spread of its speed-up.",
    "The same-epochs static control (static_ft) has the epochs of every fine-tuned lineage "
    "(scratch + fine-tune) except the selector's, which adds its own epochs on the LD backbone.",
    "Early-exit criterion rows (N-best posterior, entropy thresholds) as in the authors' code; "
    "max_prob is ours.",
    "Checkpoints are selected on full-depth dev WER.",
    "The static start (and its same-epochs control) trains with an InterCTC-style loss at half "
    "depth (weight 0.3; its own head, where InterCTC shares the final projection): on this CPU "
    "budget plain CTC reached dev WER 0.68 after 12 epochs. Every fine-tuned method inherits a "
    "backbone whose lower half was also trained to be read out by CTC, which may favour the "
    "depth-reduced budgets over the papers' plain-CTC start; the half-depth head is dropped.",
    "Held-out test voices whose speakers or engines the training voices span (flite rms, festival "
    "kal_diphone, unseen espeak accents): holding out slt, the only female non-espeak speaker, "
    "gave ~100 % WER on two thirds of the test split for every model.",
)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a protocol and a budget label. ``{L}``, ``{L/3}``, ``{2L/3}``
    ... in the label are fractions of the model's depth L, resolved from the data."""

    protocol: str
    budget: str = ""  # "" for run-level metrics (training time)

    def resolve(self, layers: int) -> "Side":
        label = re.sub(r"\{(\d*)L(?:/(\d+))?\}",
                       lambda m: str(round(int(m[1] or 1) * layers / int(m[2] or 1))), self.budget)
        return Side(self.protocol, label)

    def __str__(self) -> str:
        return f"{self.protocol} {self.budget}".strip()


@dataclass(frozen=True)
class Metric:
    """How a compared quantity is shown: ``value * scale`` with ``digits`` decimals + unit.
    Lower is better for every metric here (WER, time)."""

    name: str
    scale: float
    unit: str
    digits: int

    def show(self, value: float) -> str:
        return f"{value * self.scale:.{self.digits}f}{self.unit}"


KINDS = ("better", "faster", "on par or better", "context")
METRICS = {
    "wer": Metric("WER", 100.0, " %", 2),
    "rtf": Metric("real-time factor", 1.0, "", 4),
    "relative_rtf": Metric("real-time factor / full depth's", 1.0, "", 3),
    "seconds_to_target": Metric("training time to the target dev WER", 1 / 60, " min", 1),
}


@dataclass(frozen=True)
class Claim:
    """A paper's claim as a comparison of ``a`` against ``b`` (lower ``metric`` is better).

    ``kind``: "better" / "faster" (A lower beyond the spread), "on par or better" (A not higher
    beyond the spread) or "context" (numbers only, no verdict). ``target``: for the
    ``seconds_to_target`` metric, the protocol whose final-epoch dev WER (same seed) each side
    has to reach. ``operating_point`` is declared here, before any result is read.
    """

    id: str
    group: str
    source: str  # seed paper's arXiv id, or "" for our own controls
    statement: str  # the paper's statement
    paper_number: str  # the paper's number, as text ("" when it gives none)
    a: Side
    b: Side
    operating_point: str
    metric: str = "wer"
    kind: str = "better"
    target: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS or self.metric not in METRICS:
            raise ValueError(f"claim {self.id}: kind must be one of {KINDS} and metric one of {list(METRICS)}")


_DLD_GROUP = f"DLD vs plain layer dropping (arXiv {DLD})"
_SELECTOR_GROUP = f"Input-conditioned layer selector (arXiv {SELECTOR})"
_BLANK_GROUP = f"CTC-blank frame skipping (arXiv {BLANK_SKIP})"
_EXIT_GROUP = f"Early exit: from scratch vs fine-tuned (arXiv {EARLY_EXIT})"
_CONTEXT_GROUP = "Static control (same total epochs) vs each method at full depth"
_EXITS = (("low", "L/3"), ("mid", "2L/3"), ("full", "L"))

CLAIMS: Tuple[Claim, ...] = (
    Claim("dld-none", _DLD_GROUP, DLD, "DLD lowers WER vs LD at no dropping", "-2.25 % relative WER",
          Side("dld", "n={L}"), Side("layer_drop", "n={L}"), "all L layers (no dropping)"),
    Claim("dld-mid", _DLD_GROUP, DLD, "DLD lowers WER vs LD at mid dropping (between the two gains)", "",
          Side("dld", "n={2L/3}"), Side("layer_drop", "n={2L/3}"), "2L/3 evenly spaced layers"),
    Claim("dld-high", _DLD_GROUP, DLD, "DLD lowers WER vs LD at high dropping", "-9.32 % relative WER",
          Side("dld", "n={L/3}"), Side("layer_drop", "n={L/3}"), "L/3 evenly spaced layers"),
    Claim("dld-train-time", _DLD_GROUP, DLD, "DLD needs less training time than LD", "33.3 % less training time",
          Side("dld"), Side("layer_drop"), "wall time until dev WER <= LD's final-epoch dev WER (same seed)",
          metric="seconds_to_target", kind="faster", target="layer_drop"),
    Claim("ld-drift", _DLD_GROUP, "", "(our control) fine-tuning LD at the full lr keeps full-depth WER", "",
          Side("layer_drop", "n={L}"), Side("layer_drop_small_lr", "n={L}"), "all L layers; lr vs lr/10",
          kind="on par or better"),
    Claim("selector-vs-random", _SELECTOR_GROUP, SELECTOR, "the selector clearly beats random dropping", "",
          Side("selector", "k={L/2}"), Side("selector", "n={L/2} random"), "k = L/2, same backbone"),
    Claim("selector-vs-spaced", _SELECTOR_GROUP, SELECTOR,
          "the selector clearly beats random dropping (here: our fixed evenly spaced layers)", "",
          Side("selector", "k={L/2}"), Side("selector", "n={L/2}"), "k = L/2, same backbone"),
    *(Claim(f"selector-vs-exit-{name}", _SELECTOR_GROUP, SELECTOR,
            "the selector is on par with or better than early exit at equal compute", "",
            Side("selector", f"k={{{depth}}}"), Side("early_exit_scratch", f"exit={{{depth}}}"),
            f"{depth} layers executed; early exit from scratch", kind="on par or better")
      for name, depth in _EXITS[:2]),
    Claim("blank-skip-speed", _BLANK_GROUP, BLANK_SKIP, "blank skipping speeds up inference", "29 % faster",
          Side("blank_skip", "tau=0.9"), Side("blank_skip", "full"), "tau = 0.9 vs no skipping, same model",
          metric="relative_rtf", kind="faster"),
    Claim("blank-skip-wer", _BLANK_GROUP, BLANK_SKIP, "blank skipping costs at most a minor WER loss", "minor WER loss",
          Side("blank_skip", "tau=0.9"), Side("blank_skip", "full"), "tau = 0.9 vs no skipping, same model",
          kind="on par or better"),
    *(Claim(f"exit-scratch-{name}", _EXIT_GROUP, EARLY_EXIT, "training from scratch beats fine-tuning a "
            "pre-trained backbone", "", Side("early_exit_scratch", f"exit={{{depth}}}"),
            Side("early_exit_ft", f"exit={{{depth}}}"), f"exit after {depth} layers")
      for name, depth in _EXITS),
    *(Claim(f"static-vs-{side.protocol}", _CONTEXT_GROUP, "", "(context)", "", side, Side("static_ft", "full"),
            "full depth", kind="context")
      for side in (Side("static", "full"), Side("layer_drop", "n={L}"), Side("layer_drop_small_lr", "n={L}"),
                   Side("dld", "n={L}"), Side("selector", "k={L}"), Side("early_exit_ft", "exit={L}"),
                   Side("early_exit_scratch", "exit={L}"), Side("blank_skip", "full"))),
)


# ----------------------------------------------------------------------------- input


def check_results(results: object, source: str = "results") -> Dict:
    """Check the schema :func:`aggregate` and friends rely on; returns ``results``.

    Raises:
        ValueError: naming ``source`` and the offending run / field.
    """
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise ValueError(f"{source}: expected a JSON object with a 'runs' list")
    if not isinstance(results.get("corpus", {}), dict):
        raise ValueError(f"{source}: 'corpus' must be an object")
    seen = set()
    for i, run in enumerate(results["runs"]):
        where = f"{source}: runs[{i}]"
        if not (isinstance(run, dict) and isinstance(run.get("protocol"), str)
                and isinstance(run.get("budgets"), list)):
            raise ValueError(f"{where}: expected an object with a 'protocol' string and a 'budgets' list")
        if not _is_number(run.get("seed")):
            raise ValueError(f"{where}: 'seed' must be a number, got {run.get('seed')!r}")
        if (run["protocol"], run["seed"]) in seen:
            raise ValueError(f"{where}: a second run of protocol {run['protocol']!r} with seed {run['seed']}")
        seen.add((run["protocol"], run["seed"]))
        for j, row in enumerate(run["budgets"]):
            if not isinstance(row, dict) or not isinstance(row.get("budget"), str):
                raise ValueError(f"{where}.budgets[{j}]: expected an object with a 'budget' label")
            bad = [f for f in REQUIRED_BUDGET_FIELDS if not _is_number(row.get(f))]
            if bad:
                raise ValueError(f"{where}.budgets[{j}] ({row['budget']}): {', '.join(bad)} must be numbers")
    return results


def load_results(path: Path) -> Dict:
    """Read and check ``path``. Raises ValueError (one line, naming the file) when it is
    missing, unreadable, not JSON or not the results schema."""
    try:
        results = json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read the results file ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return check_results(results, str(path))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def num_layers(results: Dict) -> int:
    """The model's depth L: the largest depth any budget label names (``n=6``, ``k=6``,
    ``exit=6``; random-mask rows never run every layer); :data:`DEFAULT_LAYERS` when there is none yet."""
    depths = [int(m[1]) for run in results["runs"] for row in run["budgets"]
              if (m := re.fullmatch(r"(?:n|k|exit)=(\d+)", row["budget"]))]
    return max(depths, default=DEFAULT_LAYERS)


def _runs(results: Dict) -> Dict[str, Dict[float, Dict]]:
    """``{protocol: {seed: run}}``, protocols in first-seen order."""
    index: Dict[str, Dict[float, Dict]] = {}
    for run in check_results(results)["runs"]:
        index.setdefault(run["protocol"], {})[run["seed"]] = run
    return index


def _protocols(index: Dict[str, Dict]) -> List[str]:
    return [p for p in PROTOCOL_ORDER if p in index] + [p for p in index if p not in PROTOCOL_ORDER]


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof = 1; NaN for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Optional["Stat"]:
        """``None`` for no values."""
        if not len(values):
            return None
        values = np.asarray(values, dtype=float)
        return cls(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values))

    @property
    def spread(self) -> float:
        return 0.0 if math.isnan(self.std) else self.std


def aggregate(results: Dict) -> Dict[str, Dict]:
    """Statistics over seeds.

    Returns ``{"budgets": {(protocol, budget): {"seeds": (seed, ...), metric: Stat | None for
    metric in BUDGET_METRICS}}, "protocols": {protocol: {"method", "init", "seeds", "epochs"
    (the distinct values), "train_minutes": Stat | None}}}``; a metric's Stat counts only the
    seeds that report it.
    """
    index = _runs(results)
    budgets: Dict[Tuple[str, str], Dict] = {}
    protocols: Dict[str, Dict] = {}
    for protocol in _protocols(index):
        runs = index[protocol]
        first = next(iter(runs.values()))
        protocols[protocol] = {
            "method": first.get("method", protocol), "init": first.get("init"), "seeds": tuple(sorted(runs)),
            "epochs": tuple(sorted({r["epochs"] for r in runs.values() if r.get("epochs") is not None})),
            "train_minutes": Stat.of([r["train_seconds"] / 60 for r in runs.values()
                                      if _is_number(r.get("train_seconds"))]),
        }
        labels = list(dict.fromkeys(row["budget"] for run in runs.values() for row in run["budgets"]))
        for label in labels:
            rows = {seed: row for seed, run in runs.items() for row in run["budgets"] if row["budget"] == label}
            budgets[protocol, label] = {"seeds": tuple(sorted(rows)), **{
                metric: Stat.of([row[metric] for row in rows.values() if _is_number(row.get(metric))])
                for metric in BUDGET_METRICS}}
    return {"budgets": budgets, "protocols": protocols}


# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """A claim's outcome: ``verdict`` text, ``why`` (the numbers in words), ``magnitude``
    (ours vs the paper's number) and each side's Stat over the compared seeds."""

    claim: Claim
    a: Side
    b: Side
    verdict: str
    why: str
    magnitude: str = ""
    stat_a: Optional[Stat] = None
    stat_b: Optional[Stat] = None


def _seconds_to_reach(run: Dict, target: float) -> Optional[Tuple[float, bool]]:
    """Wall seconds (cumulative ``epoch_seconds``) until ``run``'s dev WER first is <= target,
    and whether it never got there (then: its whole training time, a lower bound)."""
    wers, seconds = run.get("dev_wer_per_epoch") or [], run.get("epoch_seconds") or []
    epochs = min(len(wers), len(seconds))
    if not epochs:
        return None
    elapsed = np.cumsum(seconds[:epochs])
    reached = np.flatnonzero(np.asarray(wers[:epochs], dtype=float) <= target)
    return (float(elapsed[reached[0]]), False) if reached.size else (float(elapsed[-1]), True)


def _budget_value(row: Dict, metric: str) -> Optional[float]:
    """A budget row's ``metric``. ``relative_rtf`` is its real-time factor over its run's
    full-depth row's (1 / ``speedup``): both timed in one interleaved pass, so the speed of
    the machine that day cancels -- it does not between runs timed in different sessions."""
    if metric == "relative_rtf":
        speedup = row.get("speedup")
        return 1.0 / speedup if _is_number(speedup) and speedup > 0 else None
    return row[metric] if _is_number(row.get(metric)) else None


def _values(index: Dict, claim: Claim, side: Side) -> Dict[float, Tuple[float, bool]]:
    """``{seed: (value, censored)}`` of ``claim.metric`` for ``side`` (seeds lacking it left out)."""
    values = {}
    for seed, run in index.get(side.protocol, {}).items():
        if claim.target is not None:
            reference = index.get(claim.target, {}).get(seed, {}).get("dev_wer_per_epoch")
            value = _seconds_to_reach(run, reference[-1]) if reference else None
        else:
            row = next((r for r in run["budgets"] if r["budget"] == side.budget), {})
            number = _budget_value(row, claim.metric)
            value = None if number is None else (number, False)
        if value is not None:
            values[seed] = value
    return values


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def verdict(claim: Claim, results: Dict) -> Verdict:
    """Judge ``claim`` on ``results`` (see :data:`VERDICT_RULE`)."""
    index = _runs(results)
    layers = num_layers(results)
    a, b = claim.a.resolve(layers), claim.b.resolve(layers)
    metric = METRICS[claim.metric]
    values_a, values_b = _values(index, claim, a), _values(index, claim, b)
    missing = [str(side) for side, values in ((a, values_a), (b, values_b)) if not values]
    if missing:
        return Verdict(claim, a, b, "not run yet", f"no results for {' or '.join(missing)}")
    # Paired by seed where both sides have the seed; unpaired (every seed) when none is shared.
    common = sorted(set(values_a) & set(values_b))
    if common:
        values_a, values_b = ({s: v[s] for s in common} for v in (values_a, values_b))
    stat_a = Stat.of([v for v, _ in values_a.values()])
    stat_b = Stat.of([v for v, _ in values_b.values()])
    difference, spread = stat_a.mean - stat_b.mean, stat_a.spread + stat_b.spread
    beyond = abs(difference) > spread
    numbers = (f"{a} {_show(stat_a, metric)} vs {b} {_show(stat_b, metric)}: difference "
               f"{metric.show(abs(difference))} {'>' if beyond else '<='} spread {metric.show(spread)}")
    censored = sorted(s for s, (_, c) in values_a.items() if c)
    if censored:
        numbers += (f"; {a.protocol} never reached {claim.target}'s final dev WER in seed(s) "
                    f"{', '.join(str(s) for s in censored)} (its whole training time counts, a lower bound)")
    seeds = min(stat_a.n, stat_b.n)
    magnitude = _magnitude(claim, stat_a, stat_b)
    if claim.kind == "context":
        return Verdict(claim, a, b, "context", numbers, magnitude, stat_a, stat_b)
    if seeds < MIN_SEEDS:
        return Verdict(claim, a, b, f"inconclusive ({_plural(seeds, 'seed')})",
                       f"{numbers}; fewer than {MIN_SEEDS} seeds", magnitude, stat_a, stat_b)
    worse_beyond = beyond and difference > 0  # lower is better for every metric
    if claim.kind == "on par or better":
        text = "not reproduced" if worse_beyond else "reproduced"
    elif worse_beyond:
        text = "not reproduced"
    else:
        # A censored time is a lower bound: it can refute a speed-up but never confirm one.
        text = "reproduced" if beyond and not censored else "inconclusive"
    return Verdict(claim, a, b, text, numbers, magnitude, stat_a, stat_b)


def _show(stat: Stat, metric: Metric) -> str:
    """``21.30 ± 0.40 % (n=3)`` (no ± for one seed)."""
    return f"{_stat_cell(stat, metric.scale, metric.digits)}{metric.unit} (n={stat.n})"


def _magnitude(claim: Claim, stat_a: Stat, stat_b: Stat) -> str:
    """Ours as a relative change of A vs B (and a speed-up for "faster"), beside the paper's."""
    if not stat_b.mean:
        return ""
    ours = f"ours {100 * (stat_a.mean / stat_b.mean - 1):+.1f} % relative"
    if claim.kind == "faster" and stat_a.mean:
        ours += f" ({stat_b.mean / stat_a.mean:.2f}x)"
    return f"paper {claim.paper_number}; {ours}" if claim.paper_number else ours


VERDICT_RULE = f"""\
For every claim, each side is the mean ± sample standard deviation (ddof = 1) over seeds, paired
by seed where both sides have the seed (the shared seeds only; every seed when none is shared).
Lower is better for every compared metric (WER, real-time factor, training time). With
difference = mean A - mean B and spread = std A + std B:

- fewer than {MIN_SEEDS} seeds on either side: **inconclusive (k seeds)**;
- "better" / "faster": **reproduced** when A is lower and |difference| > spread; **not
  reproduced** when A is higher beyond the spread; otherwise **inconclusive**;
- "on par or better": **reproduced** unless A is higher beyond the spread, then **not
  reproduced**;
- a side without results: **not run yet**; "context" rows give the numbers without a verdict.

Speed within one model (blank skipping) compares real-time factors relative to the same run's
full-depth row, timed in the same interleaved pass, so the speed of the day's machine cancels.
Training time is the cumulative epoch wall time until the dev WER first reaches the target (LD's
final-epoch dev WER, same seed); a run that never reaches it counts its whole training time, a
lower bound, so it can refute a speed-up but not confirm one. The magnitude beside the verdict
(ours as a relative change of A vs B) is compared with the paper's number separately: it does
not enter the verdict. Operating points are fixed in `recipes/synthetic_speech/report.py` (`CLAIMS`), not
chosen after seeing the results.
"""


# ----------------------------------------------------------------------------- figure


def _is_control(label: str, labels: Sequence[str]) -> bool:
    """Rows that are a protocol's controls rather than its method: random masks, and the fixed
    evenly spaced ``n=`` layers on the selector's backbone (a protocol that also has ``k=`` rows)."""
    return "random" in label or (label.startswith("n=") and any(other.startswith("k=") for other in labels))


def figure(results: Dict, path: Path) -> None:
    """Write one PNG: test WER (%) vs executed compute (fraction of full-depth token x layers),
    one line per protocol through its budgets (control rows, see :func:`_is_control`, as faint
    markers in the protocol's colour), error bars = std over seeds on both axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    budgets = aggregate(results)["budgets"]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for protocol in dict.fromkeys(p for p, _ in budgets):
        labels = [label for p, label in budgets if p == protocol]
        color = None  # the controls take their protocol's line colour
        for control in (False, True):
            stats = sorted((budgets[protocol, label] for label in labels if _is_control(label, labels) == control),
                           key=lambda s: s["executed"].mean)
            if not stats:
                continue
            x, y = (np.array([[s[m].mean, s[m].spread] for s in stats]) * scale
                    for m, scale in (("executed", 1.0), ("wer", 100.0)))
            style = (dict(fmt="x", alpha=0.35, label=f"{protocol} (controls)") if control
                     else dict(fmt="o-", capsize=2, label=protocol))
            bars = ax.errorbar(x[:, 0], y[:, 0], xerr=x[:, 1], yerr=y[:, 1], markersize=4, color=color, **style)
            color = bars.lines[0].get_color()
    ax.set_xlabel("executed compute (fraction of full-depth token x layers)")
    ax.set_ylabel("test WER (%)")
    ax.set_title("WER vs executed compute (mean ± std over seeds)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if budgets:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write({path: lambda file: fig.savefig(file, format="png", dpi=120)})


# ----------------------------------------------------------------------------- markdown


def _cell(value: object) -> str:
    """A table cell: numbers to 4 significant digits, lists joined, nested objects as JSON."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(", ", ": "))
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def corpus_tables(corpus: Dict) -> str:
    """The free-form corpus statistics: entries whose value is an object (per split) as one
    table (a row per entry, a column per statistic), every other entry as statistic | value."""
    nested = {k: v for k, v in corpus.items() if isinstance(v, dict)}
    flat = [(k, v) for k, v in corpus.items() if k not in nested]
    parts = [_table(("statistic", "value"), flat)] if flat else []
    if nested:
        columns = list(dict.fromkeys(c for v in nested.values() for c in v))
        parts.append(_table(("", *columns), [(k, *(v.get(c) for c in columns)) for k, v in nested.items()]))
    return "\n".join(parts) or "No corpus statistics in results.json yet.\n"


LEXICON_COLUMN = "all, lexicon beam"
LM_COLUMN = "all, lexicon + LM"
BEAM_COLUMNS = {LEXICON_COLUMN: "wer_lexicon", LM_COLUMN: "wer_lm"}


def _beam_description(results: Dict) -> str:
    """The beam sizes the runs' lexicon and LM WERs were decoded with (their ``lexicon_beam``)."""
    beams = Counter(run["lexicon_beam"] for run in results.get("runs", []) if "lexicon_beam" in run)
    return (" (beam " + " or ".join(f"{beam} in {_plural(n, 'run')}" if len(beams) > 1 else str(beam)
                                    for beam, n in sorted(beams.items())) + ")") if beams else ""


def _lm_description(results: Dict) -> str:
    """How the runs' LM WERs were decoded, from their ``lm`` stamps and chosen weights."""
    scored = [run for run in results.get("runs", []) if isinstance(run.get("lm"), dict)]
    if not scored:
        return "n-gram language model (no run is scored with one yet)"
    orders = sorted({run["lm"]["order"] for run in scored})
    added = sorted({run["lm"].get("grammar_sentences", 0) for run in scored})
    grids = sorted({tuple(run["lm"]["weights"]) for run in scored})
    chosen = ", ".join(f"{w} in {n} run" + "s" * (n != 1)
                       for w, n in sorted(Counter(run["lm_weight"] for run in scored).items()))
    text = ("the training transcripts only" if added == [0] else
            f"the training transcripts and {' or '.join(f'{n:,}' for n in added)} more sentences of the corpus "
            "grammar (in-domain LM text, as an ASR LM reads far more text than its acoustic model hears; no dev "
            "or test sentence among them)")
    return (f"{'/'.join(map(str, orders))}-gram language model that KenLM's lmplz estimated on {text}; each run's "
            f"LM weight is the one of {' or '.join(str(list(g)) for g in grids)} with the lowest dev WER "
            f"(chosen: {chosen})")


def engine_table(results: Dict) -> str:
    """Full-depth test WER % per synthesis engine (greedy), then over every engine with the
    lexicon-constrained beam search, without and with the n-gram LM; mean ± std over the
    seeds that report it."""
    index = _runs(results)
    per_protocol = {p: [{**run["wer_by_engine"], **{column: run.get(key) for column, key in BEAM_COLUMNS.items()}}
                        for run in index[p].values() if isinstance(run.get("wer_by_engine"), dict)]
                    for p in _protocols(index)}
    engines = sorted({engine for runs in per_protocol.values() for scores in runs for engine in scores}
                     - set(BEAM_COLUMNS))
    columns = engines + list(BEAM_COLUMNS)
    rows = [(p, f"{len(runs)}", *(_stat_cell(Stat.of([s[e] for s in runs if _is_number(s.get(e))]), 100, 1)
                                  for e in columns))
            for p, runs in per_protocol.items() if runs]
    if not rows:
        return "No run reports its WER per engine yet.\n"
    return _table(("protocol", "seeds", *columns), rows)


def _stat_cell(stat: Optional[Stat], scale: float = 1.0, digits: int = 3) -> str:
    if stat is None:
        return ""
    spread = "" if math.isnan(stat.std) else f" ± {stat.std * scale:.{digits}f}"
    return f"{stat.mean * scale:.{digits}f}{spread}"


def claim_table(verdicts: Sequence[Verdict]) -> str:
    """One table for a group of claims: claim, paper, ours, verdict, why, magnitude."""
    rows = []
    for v in verdicts:
        c, metric = v.claim, METRICS[v.claim.metric]
        paper = f"{c.statement}" + (f" ({c.paper_number})" if c.paper_number else "") + \
            (f", arXiv {c.source}" if c.source else "")
        ours = "" if v.stat_a is None else f"{_show(v.stat_a, metric)} vs {_show(v.stat_b, metric)}"
        rows.append((f"**{c.id}**: {v.a} vs {v.b}, {metric.name}, {c.kind}; at {c.operating_point}",
                     paper, ours, f"**{v.verdict}**", v.why, v.magnitude))
    return _table(("claim", "paper", "ours (mean ± std, n)", "verdict", "why", "magnitude"), rows)


def paper_exit_table(results: Dict) -> str:
    """The early-exit paper's per-exit WER beside ours (scratch and fine-tuned), as context."""
    budgets = aggregate(results)["budgets"]
    exits = sorted(set(PAPER_EXIT_WER) | {int(m[1]) for _, label in budgets
                                          if (m := re.fullmatch(r"exit=(\d+)", label))})
    rows = [(e, f"{PAPER_EXIT_WER[e]:.1f}" if e in PAPER_EXIT_WER else "",
             *(_stat_cell(budgets.get((p, f"exit={e}"), {}).get("wer"), 100, 1)
               for p in ("early_exit_scratch", "early_exit_ft"))) for e in exits]
    return (_table(("exit depth", "paper WER % (12 layers, LibriSpeech test-clean, scratch)",
                    "ours scratch WER %", "ours fine-tuned WER %"), rows) +
            f"\nContext only: the paper's model has 12 layers and LibriSpeech-960; ours has "
            f"{num_layers(results)} layers and synthetic speech, so exit k is a different fraction of "
            f"the depth and the scales differ.\n")


def selector_choice_table(results: Dict) -> str:
    """Per seed and budget k < L, how input-conditioned the selector's choice was on the test
    split: distinct masks, the most common one and its share; *spaced* where every utterance
    ran the evenly spaced ``n=k`` mask of the same run (then selector-vs-spaced compares the
    model with itself). Empty until a selector run records its layer choices."""
    layers = num_layers(results)
    runs = {seed: {row["budget"]: row for row in run["budgets"]}
            for seed, run in sorted(_runs(results).get("selector", {}).items())}
    budgets = [f"k={k}" for k in range(layers - 1, 0, -1)]
    rows = []
    for seed, by_label in runs.items():
        cells = []
        for label in budgets:
            row, spaced = by_label.get(label, {}), by_label.get(label.replace("k=", "n="), {})
            if row.get("distinct_masks") is None:
                cells.append("")
                continue
            same = (row["distinct_masks"] == spaced.get("distinct_masks") == 1
                    and row["top_mask"] == spaced.get("top_mask"))
            cells.append(f"{row['distinct_masks']} · {row['top_mask']} · {row['top_mask_share'] * 100:.0f} %"
                         + (" · *spaced*" if same else ""))
        if any(cells):
            rows.append((seed, *cells))
    if not rows:
        return ""
    return ("Is the choice input-conditioned? Each cell: the number of distinct layer masks the selector chose "
            "over the test utterances · the most common mask (layer 1 first, 1 = ran) · the share of utterances "
            "that ran it; *spaced*: every utterance ran the evenly spaced mask of the same size, so there the "
            "selector-vs-spaced claim compares the model with itself.\n\n"
            + _table(("seed", *budgets), rows))


# How each timing scheme a run may be stamped with (its "timing": {"scheme", "utterances",
# "repeats"}) measured the real-time factor.
TIMING_SCHEMES = {
    "interleaved": "each batch's fastest of {repeats} runs, the runs interleaved over the method's budgets so that "
                   "the shared machine's slow spells do not favour one budget",
}


def _timing_key(stamp) -> Optional[Tuple[str, int, int]]:
    if isinstance(stamp, dict) and stamp.get("scheme") in TIMING_SCHEMES:
        return stamp["scheme"], stamp["utterances"], stamp["repeats"]
    return None


def timing_sentence(runs: Sequence[Dict]) -> str:
    """How the runs' real-time factors were measured, from their ``timing`` stamps; runs
    without a known stamp are counted, not described."""
    counts = Counter(_timing_key(run.get("timing")) for run in runs)
    others = counts.pop(None, 0)
    described = [f"{_plural(n, 'run')} on the first {utterances} test utterances, "
                 f"{TIMING_SCHEMES[scheme].format(repeats=repeats)}"
                 for (scheme, utterances, repeats), n in sorted(counts.items())]
    out = []
    if described:
        out.append("Real-time factor: inference seconds (front-end, encoder and heads; no fbank, no decoding) "
                   "over audio seconds; " + "; ".join(described) + ".")
    if others:
        out.append(f"{_plural(others, 'run')} timed each budget's repeats back to back (an earlier scheme; "
                   "`python -m recipes.synthetic_speech run` re-times them on its next visit).")
    return " ".join(out)


def training_time_sentence(runs: Sequence[Dict]) -> str:
    """Where the runs' training wall times come from: the session that trained each run, or,
    for a run rebuilt in a later session (``training_timed_again``), that rebuild."""
    text = ("Train minutes: wall time of the training epochs (dev decoding excluded) on the machine of "
            "the session that trained the run; machine speed differs between sessions, so compare times "
            "within a seed.")
    rebuilt = [f"{run['protocol']} seed {run['seed']}" for run in runs if run.get("training_timed_again")]
    if rebuilt:
        text += (f" Timed again when rebuilt (`training_timed_again`, same dev WER after every epoch) in a "
                 f"later session, for a run to start from it or to measure it again: {', '.join(rebuilt)}.")
    return text + "\n"


def relative_to_report(path: Path, report: Path) -> str:
    """``path`` as the markdown file ``report`` links to it (relative to its folder)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(report).resolve().parent)).as_posix()


def markdown(results: Dict, figure_path: str = "results/wer_vs_compute.png",
             results_path: str = "results/results.json") -> str:
    """The whole ``results.md``: corpus, verdict rule, one table per claim group, runs,
    every budget, deviations. ``figure_path``, ``results_path``: the PNG and the results JSON,
    relative to the markdown file (:func:`relative_to_report`)."""
    agg = aggregate(results)
    layers = num_layers(results)
    corpus = results.get("corpus", {})
    out = ["# Results: the seed papers' claims, reproduced in miniature\n",
           f"Generated by `python -m recipes.synthetic_speech run` (or `python -m recipes.synthetic_speech run --report-only`) from `{results_path}` "
           f"({_plural(len(results['runs']), 'run')}; model depth L = {layers}, the deepest budget label"
           f"{'' if results['runs'] else ' (the default until runs exist)'}); regenerate it at any time: "
           f"missing runs show as *not run yet*.\n",
           f"![WER vs executed compute]({figure_path})\n",
           "Lines: each protocol's budgets, mean ± std over seeds on both axes; faint x: controls "
           "(random masks; on the selector's backbone also its fixed evenly spaced layers).\n",
           "## Corpus\n", corpus_tables(corpus),
           "## Verdict rule\n", VERDICT_RULE,
           "## Claims\n"]
    verdicts = [verdict(c, results) for c in CLAIMS]
    for group in dict.fromkeys(c.group for c in CLAIMS):
        out += [f"### {group}\n", claim_table([v for v in verdicts if v.claim.group == group])]
        if group == _EXIT_GROUP:
            out.append(paper_exit_table(results))
        if group == _SELECTOR_GROUP and (choices := selector_choice_table(results)):
            out.append(choices)
    out += ["## Runs\n", _table(("protocol", "method", "init", "epochs", "seeds", "train minutes"), [
        (p, e["method"], e["init"], e["epochs"], f"{len(e['seeds'])} ({_cell(e['seeds'])})",
         _stat_cell(e["train_minutes"], digits=1)) for p, e in agg["protocols"].items()]),
        training_time_sentence(results["runs"]),
        "## Every budget\n",
        "Test WER, executed compute (fraction of full-depth token x layers), real-time factor "
        "(2 threads and 1 thread), speed-up over the method's full-depth row (2 threads), the share of "
        "frames whose best label is blank, the share of frames that skipped the upper layers, the "
        "mean exit depth, and for methods that choose each utterance's layers the number of distinct layer "
        "masks over the test utterances and the most common mask's share of them: mean ± std over seeds. "
        f"{timing_sentence(results['runs'])}\n",
        _table(("protocol", "budget", "WER % (n)", "executed", "rtf", "rtf 1 thread", "speed-up", "blank %",
                "skipped %", "exit", "masks", "top mask %"), [
            (p, label, f"{_stat_cell(s['wer'], 100, 2)} ({len(s['seeds'])})", _stat_cell(s["executed"]),
             _stat_cell(s["rtf"], digits=4), _stat_cell(s["rtf_1thread"], digits=4), _stat_cell(s["speedup"], digits=2),
             _stat_cell(s["blank_fraction"], 100, 1), _stat_cell(s["skipped_frame_fraction"], 100, 1),
             _stat_cell(s["mean_exit_depth"], digits=2), _stat_cell(s["distinct_masks"], digits=1),
             _stat_cell(s["top_mask_share"], 100, 1))
            for (p, label), s in agg["budgets"].items()]),
        "## Test WER by engine\n",
        "Full depth, greedy, every held-out voice of one synthesis engine: the test split's voices are a "
        "different distance from the training voices (espeak: unseen accents and variants; flite: rms, a "
        "speaker no engine trains on; festival: its diphone engine, never trained on, for the kal speaker "
        f"that flite trains on). *{LEXICON_COLUMN}*: the whole test split decoded by a beam search restricted "
        f"to the corpus vocabulary{_beam_description(results)}, no language model. *{LM_COLUMN}*: the same "
        "search scored by a word "
        f"{_lm_description(results)}. A cell's mean is over the seeds that report it.\n",
        engine_table(results),
        "## Deviations from the papers\n", "\n".join(f"- {d}" for d in DEVIATIONS) + "\n"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=CURRENT_RESULTS / "results.json",
                        help="the multi-seed results JSON (default the recipe's results/v3/results.json)")
    parser.add_argument("--out", type=Path, default=CURRENT_RESULTS / "results.md",
                        help="where the markdown report goes (default results/v3/results.md)")
    parser.add_argument("--figure", type=Path, default=CURRENT_RESULTS / "wer_vs_compute.png",
                        help="where the PNG goes (default results/v3/wer_vs_compute.png)")


def draw(results: Dict, report: Path, png: Path, results_json: Path) -> str:
    """Write the figure to ``png`` and return the markdown of ``report``, linking ``png`` and
    ``results_json`` relative to it."""
    figure(results, png)
    return markdown(results, relative_to_report(png, report), relative_to_report(results_json, report))


def run(args: argparse.Namespace) -> int:
    """Write ``args.out`` and ``args.figure`` from ``args.results``.

    Raises:
        ValueError: the results file is missing, unreadable or malformed (naming it).
    """
    results = load_results(Path(args.results))
    out, png = Path(args.out), Path(args.figure)
    text = draw(results, out, png, Path(args.results))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write({out: lambda file: file.write(text.encode())})
    print(f"wrote {out} and {png}")
    return 0
