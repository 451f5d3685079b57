"""``python -m recipes.synthetic_speech run``: the seed papers' protocols, every one for several seeds, resumable.

One run = one protocol (a method, where it starts, how long and how fast it trains) for one
seed, in ``<runs>/<protocol>/seed<k>/``: ``dynenc train``'s checkpoints and log, then
``result.json`` (the test-split budget sweep: WER, executed compute, real-time factor at 2
and 1 threads; the full-depth WER per engine, with a lexicon and with an n-gram LM). A run
whose ``result.json`` exists is skipped (only measured again where it was measured another
way: its speeds, its LM WER, :func:`_update`); one with a ``last.pt`` resumes; so ``make
recipe`` can be stopped anywhere and started again. After every run the results of all
finished runs are gathered into ``results.json`` and the report
(:mod:`recipes.synthetic_speech.report`) is regenerated.

Protocols (:data:`PROTOCOLS`): every compared model gets the same number of epochs in total
(``scratch + finetune``), and every fine-tuned one starts from the same static model of its
seed; checkpoints are chosen on full-depth dev WER (``dynenc train``'s ``model.pt``).

Typical use::

    python -m recipes.synthetic_speech run --seeds 0 1 2              # corpus, units, every run, the report
    python -m recipes.synthetic_speech run --status                   # what is done, what is left
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from dynenc.asr import load_checkpoint
from dynenc.asr.checkpoint import find_checkpoint
from dynenc.asr import ModelConfig
from dynenc.config import config_json, load_config, save_config
from dynenc.fileio import atomic_write, json_writer
from dynenc.methods import FullBudget, get_method
from dynenc.methods.static import check_inter_ctc_weight
from dynenc.runlock import hold_run_directory
from dynenc.validation import check_device, check_int, check_real
from dynenc.asr.manifest import read_manifest

from . import CURRENT_RESULTS
from .corpus import corpus_statistics, vocabulary_path
from dynenc.asr.evaluate import BeamSearch, decode_split, speedups, time_budgets
from dynenc.asr.features import FBANK_OPTIONS, load_split, torch_threads
from .language_model import ngram_lm
from .synthesis import synthesize_corpus
from dynenc.asr.tokenizer import load_tokenizer, parse_units, prepare_units
from dynenc.asr.train import train
from dynenc.asr.train_config import TrainConfig, default_model

__all__ = ["Protocol", "PROTOCOLS", "RecipePlan", "run_dir", "run_one", "restore_results", "gather_results",
           "add_arguments", "run"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How one kind of run trains.

    Attributes:
        name: the run's name (``<runs>/<name>/seed<k>``).
        method: the registered method it trains.
        init: the protocol (same seed) whose ``model.pt`` initialises it; None = from scratch.
        epochs: ``"scratch"``, ``"finetune"``, ``"selector"`` or ``"total"`` (scratch +
            finetune): which of :class:`RecipePlan`'s epoch counts it trains for.
        lr_scale: times the plan's learning rate for its stage.
        teacher_from_init: DLD: the ``init`` model is also the frozen teacher.
        inter_ctc: train with an intermediate CTC head at half depth (InterCTC, weight
            :attr:`RecipePlan.inter_ctc_weight`); inference still decodes the last layer.
        train: other :class:`TrainConfig` fields.
        why: the paper or control it stands for (the report and ``--status`` print it).
    """

    name: str
    method: str
    init: Optional[str]
    epochs: str
    lr_scale: float = 1.0
    teacher_from_init: bool = False
    inter_ctc: bool = False
    train: Tuple[Tuple[str, Any], ...] = ()
    why: str = ""


# In dependency order: a protocol's init comes before it.
PROTOCOLS: Tuple[Protocol, ...] = (
    Protocol("static", "static", None, "scratch", inter_ctc=True,
             why="the shared start of every fine-tuned run (trained with InterCTC)"),
    Protocol("layer_drop", "layer_drop", "static", "finetune", why="LD baseline (seed 000/001 authors)"),
    Protocol("dld", "dld", "static", "finetune", teacher_from_init=True,
             why="DLD: LD + KD from the frozen static model (seed 000)"),
    Protocol("static_ft", "static", "static", "finetune", inter_ctc=True,
             why="control: static with the same total epochs"),
    Protocol("layer_drop_small_lr", "layer_drop", "static", "finetune", lr_scale=0.1,
             why="control: LD drift away from its start at a 10x smaller lr"),
    Protocol("selector", "selector", "layer_drop", "selector",
             why="input-conditioned selector on the LD backbone (seed 001)"),
    Protocol("early_exit_scratch", "early_exit", None, "total", why="early exits trained from scratch (seed 003)"),
    Protocol("early_exit_ft", "early_exit", "static", "finetune", why="early exits fine-tuned (seed 003's contrast)"),
    Protocol("blank_skip", "blank_skip", "static", "finetune", train=(("skip_threshold", 0.9),),
             why="CTC-blank frame skipping, trained with skipping active (seed 002)"),
)
_BY_NAME = {protocol.name: protocol for protocol in PROTOCOLS}


@dataclasses.dataclass
class RecipePlan:
    """Everything the recipe's numbers depend on (a JSON file via ``--plan``).

    The defaults are plan v3 (``results/v3/plan.json``): the longest run (``total`` epochs)
    takes ~40 min on a 2-core CPU. ``results/v2/plan.json`` is the earlier plan behind
    ``results/v2/results.md``: half the training speech, 12 scratch epochs, lexicon beam 32.

    Attributes:
        num_train, num_dev, num_test: corpus utterances per split (test: held-out voices).
        units: CTC units, ``"char"`` or ``"bpe<N>"`` (:func:`~dynenc.asr.tokenizer.parse_units`).
        scratch_epochs, finetune_epochs, selector_epochs: epochs per stage.
        lr, finetune_lr: peak learning rates from scratch / when starting from a model.
        inter_ctc_weight: InterCTC weight of the protocols with ``inter_ctc`` (0 = plain CTC).
        max_frames: padded feature frames per training batch.
        lexicon_beam: beam size of the full-depth lexicon-constrained WERs (``wer_lexicon`` and,
            with the n-gram LM, ``wer_lm``). 128: of 32 / 64 / 128 / 256, the smallest after
            which the dev WER with the LM stopped improving (5.71 % at 128 and 256, 6.77 % at
            32; v3 static seed 0), so the search, not the beam, limits the WER.
        timing_utterances: the first N test utterances are timed (each batch's fastest of
            ``timing_repeats`` runs interleaved over the budgets, at 2 and at 1 thread); WER
            uses the whole test split.
        model: the model every protocol trains.
    """

    num_train: int = 4800
    num_dev: int = 300
    num_test: int = 1000
    units: str = "bpe64"
    scratch_epochs: int = 18
    finetune_epochs: int = 3
    selector_epochs: int = 2
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    inter_ctc_weight: float = 0.3
    max_frames: int = 2500
    lexicon_beam: int = 128
    timing_utterances: int = 200
    timing_repeats: int = 3
    model: ModelConfig = dataclasses.field(default_factory=default_model)

    def __post_init__(self) -> None:
        for name, low in (("num_train", 1), ("num_dev", 1), ("num_test", 1), ("scratch_epochs", 1),
                          ("finetune_epochs", 1), ("selector_epochs", 1), ("max_frames", 1), ("lexicon_beam", 1),
                          ("timing_utterances", 1), ("timing_repeats", 1)):
            check_int(f"RecipePlan.{name}", getattr(self, name), low=low)
        for name in ("lr", "finetune_lr"):
            if check_real(f"RecipePlan.{name}", getattr(self, name), 0.0) == 0:
                raise ValueError(f"RecipePlan.{name} must be > 0, got 0")
        check_inter_ctc_weight("RecipePlan.inter_ctc_weight", self.inter_ctc_weight)
        parse_units(self.units)

    def epochs(self, protocol: Protocol) -> int:
        return {"scratch": self.scratch_epochs, "finetune": self.finetune_epochs, "selector": self.selector_epochs,
                "total": self.scratch_epochs + self.finetune_epochs}[protocol.epochs]

    def train_config(self, protocol: Protocol, seed: int, runs: Path) -> TrainConfig:
        """The :class:`TrainConfig` of ``protocol`` for ``seed``."""
        start = None if protocol.init is None else run_dir(runs, protocol.init, seed) / "model.pt"
        lr = (self.finetune_lr if start else self.lr) * protocol.lr_scale
        model = self.model
        if protocol.inter_ctc and self.inter_ctc_weight > 0 and model.num_layers >= 2:
            model = dataclasses.replace(model, exit_depths=(model.num_layers // 2,))
        fields: Dict[str, Any] = dict(method=protocol.method, epochs=self.epochs(protocol), lr=lr, seed=seed,
                                      max_frames=self.max_frames, warmup=0.2 if start else 0.1,
                                      init=str(start or ""), model=model, inter_ctc_weight=self.inter_ctc_weight,
                                      **dict(protocol.train))
        if protocol.teacher_from_init:
            fields["teacher"] = str(start)
        return TrainConfig(**fields)


def run_dir(runs: Path, protocol: str, seed: int) -> Path:
    return Path(runs) / protocol / f"seed{seed}"


def _audio_seconds(data: Sequence) -> float:
    """Audio seconds behind fbank features (one frame per ``frame_shift`` ms)."""
    return sum(features.shape[0] for features, _ in data) * FBANK_OPTIONS["frame_shift"] / 1000.0


# How a result's speeds were measured (:func:`~dynenc.asr.evaluate.time_budgets`). The first
# results timed each budget's repeats back to back, which let the machine's slow spells favour
# one budget over another; a result stamped otherwise is re-timed when the recipe visits it.
TIMING_SCHEME = "interleaved"


def timing_stamp(plan: RecipePlan) -> Dict:
    """A result's ``timing``: the scheme and the plan's timing fields it was measured with."""
    return {"scheme": TIMING_SCHEME, "utterances": plan.timing_utterances, "repeats": plan.timing_repeats}


# What a budget row records of the layers each test utterance ran
# (:func:`~dynenc.asr.evaluate.mask_statistics`); a result without them gets them when the
# recipe visits it.
MASK_FIELDS = ("distinct_masks", "top_mask", "top_mask_share")


def decode_budgets(model, method: str, test: Sequence, tokenizer, progress: bool) -> List[Dict]:
    """Every budget of ``method`` decoded on ``test``: a row per budget with its test WER,
    executed fraction, blank / skip / exit statistics and :data:`MASK_FIELDS`."""
    rows = []
    for label, budget in tqdm(get_method(method).budgets(model), desc=f"eval {method}", disable=not progress):
        torch.manual_seed(0)  # the random-subset budgets draw the same masks in every run
        scores = decode_split(model, test, tokenizer, budget)
        rows.append({"budget": label, "wer": scores["wer"], "executed": scores["executed_fraction"],
                     **{key: scores[key] for key in ("blank_fraction", "skipped_frame_fraction", "mean_exit_depth",
                                                     *MASK_FIELDS)}})
    return rows


def sweep_budgets(model, method: str, test: Sequence, timing: Sequence, tokenizer, repeats: int,
                  progress: bool) -> List[Dict]:
    """:func:`decode_budgets` and each budget's real-time factor (:func:`time_rows`)."""
    return time_rows(decode_budgets(model, method, test, tokenizer, progress), model, method, timing, tokenizer,
                     repeats)


def time_rows(rows: List[Dict], model, method: str, timing: Sequence, tokenizer, repeats: int) -> List[Dict]:
    """Set each budget row's real-time factor (inference seconds / audio seconds, each batch's
    fastest of ``repeats`` runs interleaved over the budgets,
    :func:`~dynenc.asr.evaluate.time_budgets`) on the ``timing`` utterances at 2 threads
    (``rtf``) and 1 thread (``rtf_1thread``) and its ``speedup`` over the full-depth row;
    returns ``rows``."""
    budgets = dict(get_method(method).budgets(model))
    if [row["budget"] for row in rows] != list(budgets):
        raise ValueError(f"{method}: rows {[row['budget'] for row in rows]} are not its budgets {list(budgets)}")
    timing_audio = _audio_seconds(timing)
    for key, threads in (("rtf", 2), ("rtf_1thread", 1)):
        with torch_threads(threads):
            seconds = time_budgets(model, timing, tokenizer, list(budgets.values()), repeats)
        for row, row_seconds in zip(rows, seconds):
            row[key] = row_seconds / timing_audio
    for row, speedup in zip(rows, speedups(rows, "rtf", "executed")):
        row["speedup"] = speedup
    return rows


def wer_by_engine(model, test: Sequence, engines: Sequence[str], tokenizer) -> Dict[str, float]:
    """Full-depth test WER per synthesis engine (``engines[i]`` made ``test[i]``): the held-out
    voices of each engine are a different distance from the training voices."""
    groups: Dict[str, List] = {}
    for item, engine in zip(test, engines, strict=True):
        groups.setdefault(engine, []).append(item)
    return {engine: decode_split(model, items, tokenizer, FullBudget())["wer"]
            for engine, items in sorted(groups.items())}


def lexicon_wer(model, test: Sequence, tokenizer, data: Path, beam_size: int) -> float:
    """Full-depth test WER of a beam search restricted to the corpus vocabulary (no language
    model): how far the model is from useful once near-miss spellings are mapped to words."""
    vocabulary = vocabulary_path(data).read_text().split()
    return decode_split(model, test, tokenizer, FullBudget(), beam=BeamSearch(tokenizer, beam_size, vocabulary))["wer"]


# The word n-gram LM every run's full-depth WER is also decoded with (the ASR field's usual
# lexicon + LM decoding): its order, how many grammar sentences its text adds to the training
# transcripts (:func:`~recipes.synthetic_speech.language_model.ngram_lm`), and the LM weights the dev
# split chooses from. A result recorded with another (or none) is scored again when the
# recipe visits it.
LANGUAGE_MODEL = {"order": 3, "grammar_sentences": 200_000, "weights": [0.5, 1.0, 1.5, 2.0]}


def language_model_wer(model, dev: Sequence, test: Sequence, tokenizer, data: Path, beam_size: int) -> Dict:
    """Full-depth test WER of the lexicon beam search with the n-gram LM of the training
    transcripts and grammar sentences (:func:`~recipes.synthetic_speech.language_model.ngram_lm`) at the weight of
    :data:`LANGUAGE_MODEL` whose dev WER is lowest (the first of equals):
    ``{"wer_lm", "lm_weight", "lm"}``."""
    vocabulary = vocabulary_path(data).read_text().split()
    arpa = ngram_lm(data, LANGUAGE_MODEL["order"], LANGUAGE_MODEL["grammar_sentences"])

    def wer(split: Sequence, weight: float) -> float:
        beam = BeamSearch(tokenizer, beam_size, vocabulary, lm=arpa, lm_weight=weight)
        return decode_split(model, split, tokenizer, FullBudget(), beam=beam)["wer"]

    weight = min(LANGUAGE_MODEL["weights"], key=lambda w: wer(dev, w))
    return {"wer_lm": wer(test, weight), "lm_weight": weight, "lm": LANGUAGE_MODEL}


def beam_wers(plan: RecipePlan, model, dev: Sequence, test: Sequence, tokenizer, data: Path) -> Dict:
    """The record's full-depth beam-search WERs at ``plan.lexicon_beam``: ``wer_lexicon``
    (:func:`lexicon_wer`), the LM fields (:func:`language_model_wer`) and ``lexicon_beam``."""
    return {"wer_lexicon": lexicon_wer(model, test, tokenizer, data, plan.lexicon_beam),
            **language_model_wer(model, dev, test, tokenizer, data, plan.lexicon_beam),
            "lexicon_beam": plan.lexicon_beam}


def _check_same_corpus(out: Path, data: Path) -> None:
    """A run directory belongs to one corpus and one set of units (their cache keys,
    ``config.json`` and ``units.json``): the plan alone does not say which voices are held out."""
    corpus = {name: json.loads((Path(data) / name).read_text()) for name in ("config.json", "units.json")}
    path = out / "corpus.json"
    if not path.is_file():
        atomic_write({path: json_writer(corpus)})
    elif json.loads(path.read_text()) != corpus:
        raise ValueError(f"{out} was made from another corpus or units ({path}; now {data}): remove the "
                         "directory to rerun it on this corpus")


def _within_runs(config: TrainConfig) -> TrainConfig:
    """``config`` with its checkpoint paths cut to ``<protocol>/seed<n>/model.pt``: the runs
    directory may be moved or renamed between sessions without changing what a run is."""
    def cut(path: str) -> str:
        return path if path in ("", "self") else str(Path(*Path(path).parts[-3:]))
    return dataclasses.replace(config, init=cut(config.init), teacher=cut(config.teacher))


def _check_same_config(out: Path, config: TrainConfig) -> None:
    """A run directory belongs to one configuration: resuming it under another plan would mix them."""
    path = out / "run_config.json"
    if path.is_file():
        started, wanted = _within_runs(load_config(TrainConfig, path)), _within_runs(config)
        changed = [f.name for f in dataclasses.fields(config) if getattr(started, f.name) != getattr(wanted, f.name)]
        if changed:
            raise ValueError(f"{out} was started with another configuration ({path}: {', '.join(changed)} "
                             "differ); remove the directory to rerun it under the current plan")
    else:
        save_config(config, path)


def run_one(plan: RecipePlan, protocol: Protocol, seed: int, data: Path, runs: Path, device: str = "cpu",
            progress: bool = True) -> Dict:
    """Train (or resume) and evaluate one run; returns its record (also ``result.json``).

    Raises:
        ValueError: the run's directory was made under another plan or from another corpus
            (finished or not: a result must never be reused for a different configuration),
            its ``init`` run has no model yet, or a finished run must be measured
            again (:func:`_update`) and cannot be.
    """
    out = run_dir(runs, protocol.name, seed)
    result_path = out / "result.json"
    config = plan.train_config(protocol, seed, runs)
    if not result_path.is_file() and protocol.init is not None:
        _ensure_model(plan, _BY_NAME[protocol.init], seed, data, runs, device, progress)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, config)  # also for a finished run: its result belongs to its own plan
    _check_same_corpus(out, data)    # ... and to its own corpus and units
    if result_path.is_file():
        return _update(plan, protocol, seed, data, runs, progress)
    train(config, data, out, resume=find_checkpoint(out, "last") is not None, progress=progress, device=device)
    model, payload = load_checkpoint(find_checkpoint(out, "model"))
    model.to(device)
    tokenizer = load_tokenizer(data)
    dev, test = (load_split(data, split, tokenizer=tokenizer) for split in ("dev", "test"))
    record = {
        "method": protocol.method, "protocol": protocol.name, "seed": seed, "epochs": config.epochs,
        "init": protocol.init, "lr": config.lr, "device": str(device),
        **training_log(out),
        "best_epoch": payload.get("epoch", -1) + 1,
        "budgets": sweep_budgets(model, protocol.method, test, test[:plan.timing_utterances], tokenizer,
                                 plan.timing_repeats, progress),
        "wer_by_engine": wer_by_engine(model, test, [r.get("engine", "unknown") for r in read_manifest(data, "test")],
                                       tokenizer),
        **beam_wers(plan, model, dev, test, tokenizer, data),
        "timing": timing_stamp(plan),
    }
    atomic_write({result_path: json_writer(record)})
    return record


def _ensure_model(plan: RecipePlan, protocol: Protocol, seed: int, data: Path, runs: Path, device: str,
                  progress: bool) -> None:
    """Make sure ``protocol``'s run for ``seed`` has the ``model.pt`` that later runs start from.

    A finished run restored from the committed results (:func:`restore_results`) has its
    ``result.json`` but no checkpoint: it is trained again (its own start first) and kept
    only if its dev WER after every epoch equals the recorded one -- training is
    deterministic for a seed on one machine, so the rebuilt model is the one the result
    describes. Its result keeps every accuracy and speed figure; its training wall times
    become the rebuild's (``training_timed_again``), measured on the same day's machine as
    the runs that start from it and as the rest of its seed's protocols.

    Raises:
        ValueError: the run never finished (run it first), kept its finished ``last.pt`` but
            not its ``model.pt``, or its rebuilt training differs from the record (the runs
            built on it would start from another model).
    """
    out = run_dir(runs, protocol.name, seed)
    if find_checkpoint(out, "model") is not None:
        return
    result_path = out / "result.json"
    if not result_path.is_file():
        raise ValueError(f"runs starting from {protocol.name} (seed {seed}) need {out / 'model.pt'}, which does not "
                         f"exist: run {protocol.name} first")
    if protocol.init is not None:
        _ensure_model(plan, _BY_NAME[protocol.init], seed, data, runs, device, progress)
    config = plan.train_config(protocol, seed, runs)
    _check_same_config(out, config)
    record = json.loads(result_path.read_text())
    print(f"recipe: rebuilding {out / 'model.pt'} (its result is kept)")
    train(config, data, out, resume=find_checkpoint(out, "last") is not None, progress=progress, device=device)
    if find_checkpoint(out, "model") is None:  # it resumed from the finished training's last.pt: no epoch ran
        raise ValueError(f"{out} has the finished training's last.pt but no model.pt: remove {out / 'last.pt'} and "
                         f"{out / 'log.jsonl'} to rebuild it")
    rebuilt = training_log(out)
    if rebuilt["dev_wer_per_epoch"] != record["dev_wer_per_epoch"]:
        raise ValueError(f"{protocol.name} (seed {seed}) trained again is not the recorded run: dev WER per epoch "
                         f"{rebuilt['dev_wer_per_epoch']} vs {record['dev_wer_per_epoch']} in {result_path} "
                         f"(another machine, thread count or torch?); remove {out} and the runs that start from it "
                         "to rerun them")
    # Wall times depend on the machine of the day: keep those measured beside the runs that follow.
    atomic_write({result_path: json_writer({**record, **rebuilt, "training_timed_again": True})})


def training_log(out: Path) -> Dict[str, List[float]]:
    """A run's training as its record keeps it, from ``out/log.jsonl``: ``train_seconds``
    (total), ``epoch_seconds`` and ``dev_wer_per_epoch``."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    cumulative = [entry["train_seconds"] for entry in log]
    return {"train_seconds": cumulative[-1],
            "epoch_seconds": [round(b - a, 1) for a, b in zip([0.0] + cumulative, cumulative)],
            "dev_wer_per_epoch": [entry["dev_wer"] for entry in log]}


def _recorded_runs(plan: RecipePlan, data: Path, results_json: Path) -> Dict[Tuple[Protocol, int], Dict]:
    """The run records of ``results_json`` made under ``plan`` from the corpus in ``data``
    (not checked while the corpus is not synthesized yet), by ``(protocol, seed)``."""
    if not Path(results_json).is_file():
        return {}
    results = json.loads(Path(results_json).read_text())
    corpus_made = (Path(data) / "config.json").is_file()
    if (_trained_plan(results.get("plan")) != _trained_plan(json.loads(config_json(plan)))
            or (corpus_made and results.get("corpus") != corpus_summary(data, plan.units))):
        print(f"recipe: {results_json} was made under another plan or corpus; its runs are not restored")
        return {}
    recorded = {}
    for record in results.get("runs", []):
        protocol, seed = _BY_NAME.get(record.get("protocol")), record.get("seed")
        if protocol is None or not isinstance(seed, int):
            raise ValueError(f"{results_json}: a run record names protocol {record.get('protocol')!r}, seed "
                             f"{seed!r}; expected one of {list(_BY_NAME)} and an integer seed")
        recorded[protocol, seed] = record
    return recorded


def restore_results(plan: RecipePlan, data: Path, runs: Path, results_json: Path) -> List[Tuple[str, int]]:
    """Put the finished runs recorded in ``results_json`` (the committed results) back into
    ``runs`` where their ``result.json`` is missing, e.g. in a fresh clone, so they are
    skipped, gathered into the next results and, when a later run starts from one,
    rebuilt (:func:`_ensure_model`). Only results made under ``plan`` from the same corpus
    are restored; returns the restored ``(protocol, seed)`` pairs."""
    restored = []
    for (protocol, seed), record in _recorded_runs(plan, data, results_json).items():
        out = run_dir(runs, protocol.name, seed)
        if (out / "result.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        _check_same_config(out, plan.train_config(protocol, seed, runs))
        _check_same_corpus(out, data)
        atomic_write({out / "result.json": json_writer(record)})
        restored.append((protocol.name, seed))
    return restored


def _stale(plan: RecipePlan, record: Dict) -> Tuple[bool, bool, bool]:
    """Whether a finished run's ``(speeds, lexicon and LM WERs, layer choices)`` were measured
    another way than now (the last: not recorded, :data:`MASK_FIELDS`, by a method that
    chooses layers; the others have none to record)."""
    return (record.get("timing") != timing_stamp(plan),
            record.get("lm") != LANGUAGE_MODEL or record.get("lexicon_beam") != plan.lexicon_beam,
            get_method(record["method"]).chooses_layers and any(MASK_FIELDS[0] not in row for row in record["budgets"]))


# Plan fields that say how a finished run is measured, not what it trained: a result made
# under other values is restored and measured again (:func:`_stale`), not discarded.
MEASUREMENT_FIELDS = ("lexicon_beam", "timing_utterances", "timing_repeats")


def _trained_plan(plan: object) -> Optional[Dict]:
    """A plan's JSON without :data:`MEASUREMENT_FIELDS` (None for anything but a dict)."""
    return {key: value for key, value in plan.items() if key not in MEASUREMENT_FIELDS} \
        if isinstance(plan, dict) else None


def _update(plan: RecipePlan, protocol: Protocol, seed: int, data: Path, runs: Path, progress: bool) -> Dict:
    """A finished run's record, with what was measured another way measured again (its accuracy
    numbers stay, nothing is retrained): speeds timed under another scheme
    (:func:`timing_stamp`) by :func:`time_rows` on the run's own device; the lexicon and LM
    WERs of another beam size or :data:`LANGUAGE_MODEL` (or none) by :func:`beam_wers`; layer
    choices not yet recorded (:data:`MASK_FIELDS`) by :func:`decode_budgets`. Each needs the run's
    model; one restored without it is rebuilt first (:func:`_ensure_model`). Rewrites
    ``result.json``.

    Raises:
        ValueError: the run's device is not available here, its rebuilt model differs from
            the record, or its budgets are not its method's.
    """
    out = run_dir(runs, protocol.name, seed)
    result_path = out / "result.json"
    record = json.loads(result_path.read_text())
    retime, rescore, remask = _stale(plan, record)
    if not (retime or rescore or remask):
        return record
    run_device = check_device(f"{result_path}: measuring again on the run's device", record.get("device", "cpu"))
    _ensure_model(plan, protocol, seed, data, runs, str(run_device), progress)
    record = json.loads(result_path.read_text())  # a rebuild replaces its training times
    model, _ = load_checkpoint(find_checkpoint(out, "model"))
    model.to(run_device)
    tokenizer = load_tokenizer(data)
    test = load_split(data, "test", tokenizer=tokenizer)
    if retime:
        print(f"recipe: re-timing {protocol.name} seed {seed} ({TIMING_SCHEME} timing)")
        budgets = [dict(row) for row in record["budgets"]]
        record = {**record, "budgets": time_rows(budgets, model, record["method"], test[:plan.timing_utterances],
                                                 tokenizer, plan.timing_repeats), "timing": timing_stamp(plan)}
    if rescore:
        print(f"recipe: scoring {protocol.name} seed {seed} with beam {plan.lexicon_beam} and the "
              f"{LANGUAGE_MODEL['order']}-gram LM")
        dev = load_split(data, "dev", tokenizer=tokenizer)
        record = {**record, **beam_wers(plan, model, dev, test, tokenizer, data)}
    if remask:
        print(f"recipe: recording the layer choices of {protocol.name} seed {seed}")
        decoded = decode_budgets(model, record["method"], test, tokenizer, progress)
        if [row["budget"] for row in decoded] != [row["budget"] for row in record["budgets"]]:
            raise ValueError(f"{result_path}: budgets {[row['budget'] for row in record['budgets']]} are not "
                             f"{record['method']}'s budgets {[row['budget'] for row in decoded]}")
        record = {**record, "budgets": [{**row, **{key: new[key] for key in MASK_FIELDS}}
                                        for row, new in zip(record["budgets"], decoded)]}
    atomic_write({result_path: json_writer(record)})
    return record


def runs_to_do(seeds: Sequence[int], protocols: Sequence[Protocol]) -> Iterator[Tuple[Protocol, int]]:
    """Seed-major order, so each finished seed is a complete set of protocols."""
    for seed in seeds:
        for protocol in protocols:
            yield protocol, seed


def _voices_by_engine(speakers: Sequence[str]) -> str:
    """``"engine:voice"`` speakers grouped by engine; an engine with many voices as its base
    voices (the part before ``+``, e.g. espeak's accents) and a count."""
    voices: Dict[str, List[str]] = {}
    for speaker in speakers:
        engine, _, voice = speaker.partition(":")
        voices.setdefault(engine, []).append(voice)
    return "; ".join(
        f"{engine}: {', '.join(names)}" if len(names) <= 8 else
        f"{engine}: {len(names)} voices ({', '.join(sorted({n.split('+')[0] for n in names}))}, each with variants)"
        for engine, names in sorted(voices.items()))


def _range(values: Sequence[float]) -> str:
    return f"{values[0]:g}-{values[1]:g}" if values else ""


def corpus_summary(data: Path, units: str) -> Dict:
    """The corpus as the report shows it: engines, units, the test size, training and
    held-out voices, and one row of statistics per split (speakers counted, engines as
    utterance counts, the share reverberated, the SNR and tempo ranges)."""
    stats = corpus_statistics(data)
    splits = {split: {**{k: v for k, v in entry.items() if k not in ("reverberated", "snr_db", "tempo")},
                      "speakers": entry["speakers"]["count"],
                      "engines": ", ".join(f"{engine} {n}" for engine, n in entry["engines"].items()),
                      "reverberated %": round(100 * entry["reverberated"], 1),
                      "SNR dB": _range(entry["snr_db"]), "tempo": _range(entry["tempo"])}
              for split, entry in stats["splits"].items()}
    engines = sorted({engine for entry in stats["splits"].values() for engine in entry["engines"]})
    return {"engines": engines, "units": units, "vocabulary_size": stats["vocabulary_size"],
            "test_utterances": splits["test"]["utterances"],
            "training_voices": _voices_by_engine(stats["splits"]["train"]["speakers"]["list"]),
            "held_out_speakers": ", ".join(stats["held_out_speakers"]), **splits}


def gather_results(plan: RecipePlan, data: Path, runs: Path) -> Dict:
    """``{"corpus": :func:`corpus_summary`, "plan": ..., "runs": [every finished run's record]}``."""
    records = [json.loads(path.read_text()) for path in sorted(Path(runs).glob("*/seed*/result.json"))]
    order = {protocol.name: i for i, protocol in enumerate(PROTOCOLS)}
    records.sort(key=lambda r: (order.get(r["protocol"], len(order)), r["seed"]))
    return {"corpus": corpus_summary(data, plan.units),
            "plan": json.loads(config_json(plan)), "runs": records}


def write_report(results: Dict, results_json: Path, report_md: Path) -> None:
    from . import report

    results_json.parent.mkdir(parents=True, exist_ok=True)
    text = report.draw(results, report_md, results_json.parent / "wer_vs_compute.png", results_json)
    atomic_write({results_json: json_writer(results), report_md: lambda file: file.write(text.encode())})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/speech", help="corpus directory (made if missing)")
    parser.add_argument("--runs", default="runs/recipe", help="where the runs go (<runs>/<protocol>/seed<k>)")
    parser.add_argument("--plan", help="JSON file of RecipePlan fields (default: the recipe's plan)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    parser.add_argument("--protocols", nargs="+", choices=list(_BY_NAME), help="only these (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for training and evaluation")
    parser.add_argument("--results", type=Path, default=CURRENT_RESULTS / "results.json",
                        help="gathered results (JSON; default the recipe's results/v3/results.json)")
    parser.add_argument("--report", type=Path, default=CURRENT_RESULTS / "results.md",
                        help="the report regenerated after every run (default results/v3/results.md)")
    parser.add_argument("--status", action="store_true", help="list the runs and whether each is done, then exit")
    parser.add_argument("--report-only", action="store_true",
                        help="gather the finished runs into --results and --report, run nothing")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _status(plan: RecipePlan, runs: Path, todo: Sequence[Tuple[Protocol, int]],
            recorded: Optional[Dict[Tuple[Protocol, int], Dict]] = None) -> str:
    """A line per run: done, to measure again, started, to do, or recorded (in the committed
    results only, e.g. in a fresh clone: the next run restores it instead of training it)."""
    lines, recorded, restorable = [], recorded or {}, False
    for protocol, seed in todo:
        out = run_dir(runs, protocol.name, seed)
        result = out / "result.json"
        if result.is_file():
            record, where = json.loads(result.read_text()), ""
        else:
            record, where = recorded.get((protocol, seed)), "recorded, "
            restorable |= record is not None
        if record is not None:
            state = where + ("to measure again" if any(_stale(plan, record)) else "done")
        else:
            state = "started" if find_checkpoint(out, "last") is not None else "to do"
        lines.append(f"{protocol.name:<20} seed {seed}  {plan.epochs(protocol):>3} epochs  {state:<24} {protocol.why}")
    if restorable:
        lines.append("recorded: in the committed results only; the next run restores it instead of training it "
                     "(its model is rebuilt only when a run to do starts from it or it is measured again)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = load_config(RecipePlan, Path(args.plan)) if args.plan else RecipePlan()
    for seed in args.seeds:
        check_int("--seeds", seed, low=0)
    check_device("--device", args.device)
    check_int("--workers", args.workers, low=1)
    data, runs = Path(args.data), Path(args.runs)
    protocols = [_BY_NAME[name] for name in args.protocols] if args.protocols else list(PROTOCOLS)
    todo = list(runs_to_do(args.seeds, protocols))
    if args.status:
        print(_status(plan, runs, todo, _recorded_runs(plan, data, Path(args.results))))
        return 0
    # One recipe job per runs directory (each run's own directory is locked by dynenc train too).
    with hold_run_directory(runs):
        if args.report_only:
            restore_results(plan, data, runs, Path(args.results))
            write_report(gather_results(plan, data, runs), Path(args.results), Path(args.report))
            return 0
        _run_all(plan, todo, data, runs, args)
    return 0


def _run_all(plan: RecipePlan, todo: Sequence[Tuple[Protocol, int]], data: Path, runs: Path,
             args: argparse.Namespace) -> None:
    """The corpus, its units and features, then every run of ``todo`` with the report after each."""
    progress = not args.quiet
    synthesize_corpus(data, plan.num_train, plan.num_dev, plan.num_test, workers=args.workers, progress=progress)
    tokenizer = prepare_units(data, plan.units)
    restored = restore_results(plan, data, runs, Path(args.results))
    if restored:
        print(f"recipe: {len(restored)} finished runs restored from {args.results}")
    for split in ("train", "dev", "test"):
        load_split(data, split, progress=progress, tokenizer=tokenizer)  # features once, before the runs
    for protocol, seed in todo:
        tic = time.perf_counter()
        run_one(plan, protocol, seed, data, runs, args.device, progress)
        write_report(gather_results(plan, data, runs), Path(args.results), Path(args.report))
        print(f"recipe: {protocol.name} seed {seed} done ({time.perf_counter() - tic:.0f} s)")
