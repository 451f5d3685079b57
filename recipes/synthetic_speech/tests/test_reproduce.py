"""Tests for ``python -m recipes.synthetic_speech run`` (recipes.synthetic_speech.reproduce): protocols, resumability, results."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from dynenc.asr import load_checkpoint
from dynenc.asr import ModelConfig
from dynenc.config import config_json, load_config
from dynenc.methods import method_names
from recipes.synthetic_speech import CURRENT_RESULTS, RESULTS_DIR, cli
from recipes.synthetic_speech.language_model import find_lmplz
from recipes.synthetic_speech.reproduce import (LANGUAGE_MODEL, MASK_FIELDS, PROTOCOLS, Protocol, RecipePlan, _recorded_runs,
                                      _status, gather_results, restore_results, run_dir, run_one, timing_stamp,
                                      write_report)
from recipes.synthetic_speech.synthesis import synthesize_corpus
from dynenc.asr.tokenizer import prepare_units

needs_engines = pytest.mark.skipif(any(shutil.which(e) is None for e in ("espeak-ng", "flite", "text2wave")),
                                   reason="the speech engines are not installed")
needs_lmplz = pytest.mark.skipif(find_lmplz() is None, reason="KenLM's lmplz is not built (make kenlm)")

TINY = RecipePlan(num_train=24, num_dev=4, num_test=6, units="bpe40", scratch_epochs=1, finetune_epochs=1,
                  selector_epochs=1, max_frames=1500, timing_utterances=2, timing_repeats=1,
                  model=ModelConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, kernel_size=5, dropout=0.0))
_BY_NAME = {p.name: p for p in PROTOCOLS}


def test_protocols_are_in_dependency_order_and_registered():
    seen = set()
    for protocol in PROTOCOLS:
        assert protocol.method in method_names()
        assert protocol.init is None or protocol.init in seen, protocol.name
        seen.add(protocol.name)
    assert len(seen) == len(PROTOCOLS)


@pytest.mark.parametrize("report", ["v3", "v2", "bpe256"])
def test_committed_plans_load_and_the_defaults_are_the_current_report(report):
    # results/v3 is what `make recipe` reproduces; v2 and the bpe256 blank-skip study
    # (make recipe-v2, make recipe-bpe256) stay reproducible.
    plan = load_config(RecipePlan, RESULTS_DIR / report / "plan.json")
    assert json.loads(config_json(plan)) == json.loads((RESULTS_DIR / report / "results.json").read_text())["plan"]
    assert (plan == RecipePlan()) == (RESULTS_DIR / report == CURRENT_RESULTS)


def test_every_compared_model_gets_the_same_total_epochs():
    plan = RecipePlan()
    total = {p.name: plan.epochs(p) + (plan.epochs(_BY_NAME[p.init]) if p.init else 0) for p in PROTOCOLS}
    compared = {name: epochs for name, epochs in total.items() if name not in ("static", "selector")}
    assert len(set(compared.values())) == 1, compared


def test_train_config_follows_the_protocol(tmp_path):
    plan = RecipePlan()
    dld = plan.train_config(_BY_NAME["dld"], 2, tmp_path)
    assert dld.seed == 2 and dld.init == dld.teacher == str(run_dir(tmp_path, "static", 2) / "model.pt")
    assert dld.lr == plan.finetune_lr and dld.epochs == plan.finetune_epochs
    small = plan.train_config(_BY_NAME["layer_drop_small_lr"], 0, tmp_path)
    assert small.lr == pytest.approx(plan.finetune_lr / 10)
    scratch = plan.train_config(_BY_NAME["early_exit_scratch"], 0, tmp_path)
    assert scratch.init == "" and scratch.epochs == plan.scratch_epochs + plan.finetune_epochs
    assert plan.train_config(_BY_NAME["blank_skip"], 0, tmp_path).skip_threshold > 0


def test_inter_ctc_protocols_get_a_half_depth_head(tmp_path):
    plan = RecipePlan()
    for name in ("static", "static_ft"):
        config = plan.train_config(_BY_NAME[name], 0, tmp_path)
        assert config.model.exit_depths == (plan.model.num_layers // 2,)
        assert config.inter_ctc_weight == plan.inter_ctc_weight > 0
    for name in ("layer_drop", "dld", "early_exit_scratch"):  # the methods train their own objectives
        assert plan.train_config(_BY_NAME[name], 0, tmp_path).model.exit_depths == plan.model.exit_depths
    plain = dataclasses.replace(plan, inter_ctc_weight=0.0)
    assert plain.train_config(_BY_NAME["static"], 0, tmp_path).model.exit_depths == ()
    one_layer = dataclasses.replace(plan, model=dataclasses.replace(plan.model, num_layers=1))
    assert one_layer.train_config(_BY_NAME["static"], 0, tmp_path).model.exit_depths == ()  # no lower half


@pytest.mark.parametrize("field, value", [("num_test", 0), ("finetune_lr", 0.0), ("units", "words"),
                                          ("timing_repeats", 0), ("inter_ctc_weight", 1.0),
                                          ("inter_ctc_weight", -0.5)])
def test_plan_rejects(field, value):
    with pytest.raises(ValueError, match=field if field != "units" else "units"):
        dataclasses.replace(RecipePlan(), **{field: value})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    synthesize_corpus(root, TINY.num_train, TINY.num_dev, TINY.num_test, seed=3, progress=False)
    prepare_units(root, TINY.units)
    return root


@needs_engines
@needs_lmplz
def test_runs_resume_and_gather(corpus, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match="run static first"):
        run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False)
    static = run_one(TINY, _BY_NAME["static"], 0, corpus, runs, progress=False)
    assert static["protocol"] == "static" and static["epochs"] == 1 and static["init"] is None
    assert [row["budget"] for row in static["budgets"]] == ["full"]
    row = static["budgets"][0]
    assert 0 <= row["wer"] and row["executed"] == pytest.approx(1.0) and row["rtf"] > 0 and row["rtf_1thread"] > 0
    assert len(static["epoch_seconds"]) == len(static["dev_wer_per_epoch"]) == 1
    engines = static["wer_by_engine"]  # every test utterance's engine, each scored at full depth
    assert set(engines) <= {"espeak", "flite", "festival"} and engines and all(w >= 0 for w in engines.values())
    assert isinstance(static["wer_lexicon"], float) and static["wer_lexicon"] >= 0
    assert static["lexicon_beam"] == TINY.lexicon_beam
    # ... and with the training transcripts' n-gram LM, at the LM weight the dev split chose.
    assert isinstance(static["wer_lm"], float) and static["wer_lm"] >= 0
    assert static["lm"] == LANGUAGE_MODEL and static["lm_weight"] in LANGUAGE_MODEL["weights"]

    layer_drop = run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False)
    labels = [row["budget"] for row in layer_drop["budgets"]]
    assert labels[:2] == ["n=2", "n=1"] and "n=1 random" in labels
    assert {row["budget"]: row["executed"] for row in layer_drop["budgets"]}["n=1"] == pytest.approx(0.5)
    # Each budget row records the layers its utterances ran; full depth chooses none.
    choices = {row["budget"]: tuple(row[key] for key in MASK_FIELDS) for row in layer_drop["budgets"]}
    assert choices["n=2"] == (1, "11", 1.0) and choices["n=1"] == (1, "01", 1.0)
    assert tuple(static["budgets"][0][key] for key in MASK_FIELDS) == (None, None, None)

    # Finished runs are skipped: the record is read back, nothing retrained.
    result = run_dir(runs, "static", 0) / "result.json"
    stamp = result.stat().st_mtime_ns
    assert run_one(TINY, _BY_NAME["static"], 0, corpus, runs, progress=False) == static
    assert result.stat().st_mtime_ns == stamp
    # A method that chooses no layers has none to record: its record without them is done.
    result.write_text(json.dumps({**static, "budgets": [{k: v for k, v in row.items() if k not in MASK_FIELDS}
                                                        for row in static["budgets"]]}))
    assert " done " in _status(TINY, runs, [(_BY_NAME["static"], 0)])
    result.write_text(json.dumps(static))

    # A run directory belongs to one plan, finished or not.
    for finished in (True, False):
        if not finished:
            (run_dir(runs, "static", 0) / "result.json").unlink()
        with pytest.raises(ValueError, match="another configuration .*: lr differ"):
            run_one(dataclasses.replace(TINY, lr=1e-2), _BY_NAME["static"], 0, corpus, runs, progress=False)
    # The runs directory may move: a run's init names another run of the same directory.
    moved = tmp_path / "moved"
    runs.rename(moved)
    assert run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, moved, progress=False) == layer_drop
    moved.rename(runs)
    # ... and to one corpus: the plan does not name the held-out voices. A finished run stays finished.
    stamp = run_dir(runs, "layer_drop", 0) / "corpus.json"
    assert json.loads(stamp.read_text())["config.json"] == json.loads((corpus / "config.json").read_text())
    stamp.write_text(json.dumps({"config.json": {"version": 0}, "units.json": {}}))
    with pytest.raises(ValueError, match="another corpus"):
        run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False)
    stamp.unlink()  # a run from before the stamp existed: stamped on its next visit
    assert run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False) == layer_drop
    assert stamp.is_file()

    # A result timed another way (here: before timing stamps) is re-timed on its next visit:
    # speeds measured again, accuracy kept, nothing retrained.
    path = run_dir(runs, "layer_drop", 0) / "result.json"
    model = run_dir(runs, "layer_drop", 0) / "model.pt"
    model_stamp = model.stat().st_mtime_ns
    assert layer_drop["timing"] == timing_stamp(TINY) == {"scheme": "interleaved", "utterances": 2, "repeats": 1}
    stale = {key: value for key, value in layer_drop.items() if key != "timing"}
    stale["budgets"] = [{**row, "rtf": -1.0, "rtf_1thread": -1.0, "speedup": -1.0} for row in layer_drop["budgets"]]
    path.write_text(json.dumps(stale))
    retimed = run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False)
    assert retimed["timing"] == timing_stamp(TINY)
    assert all(row["rtf"] > 0 and row["rtf_1thread"] > 0 and row["speedup"] > 0 for row in retimed["budgets"])
    assert [row["wer"] for row in retimed["budgets"]] == [row["wer"] for row in layer_drop["budgets"]]
    assert json.loads(path.read_text()) == retimed and model.stat().st_mtime_ns == model_stamp
    # ... and so is one timed under other plan timing fields (they are not part of the run's configuration).
    more_repeats = dataclasses.replace(TINY, timing_repeats=2)
    assert run_one(more_repeats, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False)["timing"]["repeats"] == 2
    # A result scored without the n-gram LM (or with another one) is scored on its next visit.
    unscored = {key: value for key, value in retimed.items() if key not in ("wer_lm", "lm_weight", "lm")}
    path.write_text(json.dumps(unscored))
    todo = [(_BY_NAME["layer_drop"], 0)]
    assert "to measure again" in _status(TINY, runs, todo)
    assert run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False) == retimed
    assert " done " in _status(TINY, runs, todo)
    assert model.stat().st_mtime_ns == model_stamp
    # ... and one recorded before the layer choices were gets them, the rest of the record kept.
    path.write_text(json.dumps({**retimed, "budgets": [{k: v for k, v in row.items() if k not in MASK_FIELDS}
                                                       for row in retimed["budgets"]]}))
    assert "to measure again" in _status(TINY, runs, todo)
    assert run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False) == retimed
    assert json.loads(path.read_text()) == retimed and model.stat().st_mtime_ns == model_stamp
    # ... and one decoded with another beam is decoded again (lexicon and LM WERs) at the plan's.
    path.write_text(json.dumps({**retimed, "lexicon_beam": 1, "wer_lexicon": -1.0, "wer_lm": -1.0}))
    assert "to measure again" in _status(TINY, runs, todo)
    assert run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False) == retimed
    # Measuring again needs the run's model: one restored without it (a fresh clone) is rebuilt
    # first, and its record keeps its accuracy.
    path.write_text(json.dumps(stale))
    for name in ("model.pt", "last.pt", "log.jsonl", "train_config.json"):
        (run_dir(runs, "layer_drop", 0) / name).unlink()
    rebuilt = run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False)
    assert model.is_file() and rebuilt["training_timed_again"] is True and rebuilt["timing"] == timing_stamp(TINY)
    assert [row["wer"] for row in rebuilt["budgets"]] == [row["wer"] for row in layer_drop["budgets"]]
    assert rebuilt["dev_wer_per_epoch"] == layer_drop["dev_wer_per_epoch"]
    # Only model.pt lost: the finished training's last.pt would resume into no epoch at all.
    path.write_text(json.dumps(unscored))
    model.unlink()
    with pytest.raises(ValueError, match="last.pt but no model.pt: remove"):
        run_one(TINY, _BY_NAME["layer_drop"], 0, corpus, runs, progress=False)

    results = gather_results(TINY, corpus, runs)
    assert [r["protocol"] for r in results["runs"]] == ["layer_drop"]
    corpus_row = results["corpus"]
    assert corpus_row["test_utterances"] == TINY.num_test and corpus_row["units"] == "bpe40"
    assert set(corpus_row["engines"]) == {"espeak", "flite", "festival"}


@needs_engines
@needs_lmplz
def test_a_fresh_clone_restores_finished_runs_and_rebuilds_their_models(corpus, tmp_path):
    # The committed results.json is all a fresh clone has of the finished runs: no checkpoints.
    runs, results = tmp_path / "runs", tmp_path / "results.json"
    for name in ("static", "layer_drop"):
        run_one(TINY, _BY_NAME[name], 0, corpus, runs, progress=False)
    write_report(gather_results(TINY, corpus, runs), results, tmp_path / "results.md")
    report_text = (tmp_path / "results.md").read_text()  # links relative to the report, wherever it is
    assert "![WER vs executed compute](wer_vs_compute.png)" in report_text and "from `results.json`" in report_text
    originals = {name: load_checkpoint(run_dir(runs, name, 0) / "model.pt")[0].state_dict()
                 for name in ("static", "layer_drop")}

    fresh = tmp_path / "fresh"
    # Before the next run restores them, --status says the committed results hold them.
    todo = [(_BY_NAME[name], 0) for name in ("static", "layer_drop", "selector")]
    status = _status(TINY, fresh, todo, _recorded_runs(TINY, corpus, results)).splitlines()
    assert [line.split()[0] for line in status[:3]] == ["static", "layer_drop", "selector"]
    assert "recorded, done" in status[0] and "recorded, done" in status[1] and "to do" in status[2]
    assert status[3].startswith("recorded: in the committed results only")
    assert "recorded" not in _status(TINY, fresh, todo)
    assert restore_results(TINY, corpus, fresh, results) == [("static", 0), ("layer_drop", 0)]
    assert restore_results(TINY, corpus, fresh, results) == []  # already there
    assert not (run_dir(fresh, "static", 0) / "model.pt").exists()
    recorded = (run_dir(fresh, "static", 0) / "result.json").read_text()
    assert json.loads(recorded) == json.loads((run_dir(runs, "static", 0) / "result.json").read_text())

    # The selector starts from layer_drop, which starts from static: both are trained again,
    # bit-for-bit the models their results describe, and their results are kept.
    run_one(TINY, _BY_NAME["selector"], 0, corpus, fresh, progress=False)
    for name, original in originals.items():
        rebuilt = load_checkpoint(run_dir(fresh, name, 0) / "model.pt")[0].state_dict()
        assert rebuilt.keys() == original.keys(), name
        for key in original:
            assert torch.equal(rebuilt[key], original[key]), (name, key)
    # Their results keep every figure but the training wall times, now the rebuild's.
    kept = json.loads((run_dir(fresh, "static", 0) / "result.json").read_text())
    assert kept.pop("training_timed_again") is True
    retimed = ("train_seconds", "epoch_seconds")
    assert {k: v for k, v in kept.items() if k not in retimed} == \
        {k: v for k, v in json.loads(recorded).items() if k not in retimed}
    assert kept["train_seconds"] > 0 and len(kept["epoch_seconds"]) == len(kept["dev_wer_per_epoch"]) == 1
    assert [r["protocol"] for r in gather_results(TINY, corpus, fresh)["runs"]] == ["static", "layer_drop", "selector"]

    # A rebuild that does not retrace the recorded training is an error, not a silent new start.
    other = tmp_path / "other"
    restore_results(TINY, corpus, other, results)
    path = run_dir(other, "static", 0) / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dev_wer_per_epoch": [0.123]}))
    with pytest.raises(ValueError, match="static \\(seed 0\\) trained again is not the recorded run"):
        run_one(TINY, _BY_NAME["dld"], 0, corpus, other, progress=False)

    # Results of another plan are not this plan's runs; a record naming no protocol is refused.
    assert restore_results(dataclasses.replace(TINY, lr=1e-2), corpus, tmp_path / "lr", results) == []
    # ... but other measurement settings only make them stale: restored, to be measured again.
    measured_otherwise = dataclasses.replace(TINY, lexicon_beam=2, timing_repeats=2)
    assert restore_results(measured_otherwise, corpus, tmp_path / "beam", results) == [("static", 0), ("layer_drop", 0)]
    assert "to measure again" in _status(measured_otherwise, tmp_path / "beam", [(_BY_NAME["static"], 0)])
    bad = json.loads(results.read_text())
    bad["runs"][0]["protocol"] = "nope"
    results.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="protocol 'nope'"):
        restore_results(TINY, corpus, tmp_path / "bad", results)


@needs_engines
def test_cli_status_and_report_only(corpus, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(dataclasses.asdict(TINY)))
    common = ["run", "--plan", str(plan), "--data", str(corpus), "--runs", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results.json"), "--report", str(tmp_path / "results.md"), "--quiet"]
    assert cli.main(common + ["--status", "--seeds", "0", "1", "--protocols", "static", "dld"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("to do" in line for line in lines)
    assert cli.main(common + ["--report-only"]) == 0
    assert "not run yet" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == []


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "-1"], "--seeds"),
    (["--device", "tpu"], "--device"),
    (["--protocols", "nope"], "invalid choice"),
])
def test_cli_rejects(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--status"] + flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_second_recipe_job_on_the_runs_directory_is_refused(tmp_path, capsys):
    from dynenc.runlock import hold_run_directory

    runs = tmp_path / "runs"
    with hold_run_directory(runs), pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--report-only", "--runs", str(runs), "--data", str(tmp_path / "data"),
                  "--results", str(tmp_path / "results.json"), "--report", str(tmp_path / "results.md")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"run directory {runs} is in use by another job" in error
    assert not (tmp_path / "results.md").exists()
