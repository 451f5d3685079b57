"""``recipes.synthetic_speech.report``: verdicts from multi-seed results, markdown, figure, CLI errors —
all on small synthetic results dicts (no model code)."""
import json
import subprocess
import sys

import pytest

from recipes.synthetic_speech import cli, report
from recipes.synthetic_speech.report import CLAIMS, Claim, Side, aggregate, figure, markdown, verdict

CLAIM = Claim("t-better", "test", "0000.00000", "A beats B", "-10 %", Side("a", "n=2"), Side("b", "n=2"), "n=2")
ON_PAR = Claim("t-on-par", "test", "", "A on par with B", "", Side("a", "n=2"), Side("b", "n=2"), "n=2",
               kind="on par or better")


def run(protocol, seed, budgets, **fields):
    """A results run: ``budgets`` is ``{label: wer}`` (executed = n / 2 from the label)."""
    rows = [{"budget": label, "wer": wer, "executed": int(label[-1]) / 2 if label[-1].isdigit() else 1.0,
             "rtf": 0.01 * (1 + seed)} for label, wer in budgets.items()]
    return {"method": protocol, "protocol": protocol, "seed": seed, "epochs": 2, "init": None, "lr": 1e-3,
            "train_seconds": 60.0, "budgets": rows, **fields}


def results(wers_a, wers_b, label="n=2"):
    """Protocols ``a`` and ``b`` with one run per listed WER (seeds 0, 1, ...)."""
    return {"corpus": {"engines": ["espeak-ng", "flite"], "test_utterances": 10,
                       "train": {"hours": 1.5, "words": 900}, "test": {"hours": 0.2, "words": 100}},
            "runs": [run(p, s, {label: w, "n=1": w + 0.1}) for p, wers in (("a", wers_a), ("b", wers_b))
                     for s, w in enumerate(wers)]}


@pytest.mark.parametrize("claim, wers_a, wers_b, expected", [
    (CLAIM, [0.20], [0.30], "inconclusive (1 seed)"),
    (CLAIM, [0.20, 0.21], [0.30, 0.31, 0.32], "inconclusive (2 seeds)"),
    (CLAIM, [0.20, 0.21, 0.22], [0.30, 0.31, 0.32], "reproduced"),
    (CLAIM, [0.30, 0.31, 0.32], [0.20, 0.21, 0.22], "not reproduced"),
    (CLAIM, [0.20, 0.25, 0.30], [0.22, 0.27, 0.32], "inconclusive"),
    (ON_PAR, [0.22, 0.27, 0.32], [0.20, 0.25, 0.30], "reproduced"),  # worse, but within the spread
    (ON_PAR, [0.10, 0.11, 0.12], [0.30, 0.31, 0.32], "reproduced"),
    (ON_PAR, [0.30, 0.31, 0.32], [0.20, 0.21, 0.22], "not reproduced"),
], ids=["one-seed", "two-seeds", "better-beyond-spread", "opposite-beyond-spread", "overlapping",
        "on-par-within-spread", "on-par-better", "on-par-worse-beyond-spread"])
def test_verdict_rule(claim, wers_a, wers_b, expected):
    judged = verdict(claim, results(wers_a, wers_b))
    assert judged.verdict == expected
    assert "vs b n=2" in judged.why and "spread" in judged.why


def test_verdict_pairs_by_seed():
    data = results([0.20, 0.21, 0.22, 0.90], [0.30, 0.31, 0.32])  # a's seed 3 has no partner
    judged = verdict(CLAIM, data)
    assert judged.verdict == "reproduced" and judged.stat_a.n == 3
    assert judged.why == ("a n=2 21.00 ± 1.00 % (n=3) vs b n=2 31.00 ± 1.00 % (n=3): "
                          "difference 10.00 % > spread 2.00 %")
    assert judged.magnitude == "paper -10 %; ours -32.3 % relative"


@pytest.mark.parametrize("data", [results([0.2] * 3, []), results([0.2] * 3, [0.3] * 3, label="n=3")],
                         ids=["protocol-missing", "budget-missing"])
def test_missing_side_is_not_run_yet(data):
    assert verdict(CLAIM, data).verdict == "not run yet"


def training_run(protocol, seed, dev_wers):
    return run(protocol, seed, {"n=2": 0.2}, epoch_seconds=[60.0] * len(dev_wers), dev_wer_per_epoch=dev_wers)


TIME_CLAIM = next(c for c in CLAIMS if c.id == "dld-train-time")


@pytest.mark.parametrize("dld_dev, expected", [
    ([0.5, 0.3, 0.3, 0.3], "reproduced"),  # reaches LD's final 0.3 after 2 of LD's 4 epochs
    ([0.5, 0.4, 0.35, 0.31], "inconclusive"),  # never: 4 epochs is a lower bound, equal to LD's
    ([0.5, 0.4, 0.35, 0.31, 0.31, 0.31], "not reproduced"),  # never, and already slower
], ids=["reached-early", "never-reached", "never-reached-slower"])
def test_training_time_claim(dld_dev, expected):
    data = {"corpus": {}, "runs": [training_run(p, s, dev) for s in range(3) for p, dev in
                                   (("layer_drop", [0.6, 0.4, 0.32, 0.3]), ("dld", dld_dev))]}
    judged = verdict(TIME_CLAIM, data)
    assert judged.verdict == expected
    assert ("never reached layer_drop's final dev WER" in judged.why) == (expected != "reproduced")


def test_claim_budgets_follow_the_depth_in_the_data():
    data = {"corpus": {}, "runs": [run(p, s, {f"n={n}": 0.2 for n in range(1, 10)}) for p in ("dld", "layer_drop")
                                   for s in range(3)]}
    high = verdict(next(c for c in CLAIMS if c.id == "dld-high"), data)
    assert (report.num_layers(data), high.a.budget, high.verdict) == (9, "n=3", "inconclusive")


def test_aggregate_mean_and_sample_std():
    agg = aggregate(results([0.2, 0.3, 0.4], [0.1]))
    wer = agg["budgets"]["a", "n=2"]["wer"]
    assert (round(wer.mean, 6), round(wer.std, 6), wer.n) == (0.3, 0.1, 3)
    assert agg["budgets"]["b", "n=2"]["speedup"] is None  # not reported: tolerated
    assert agg["protocols"]["a"]["seeds"] == (0, 1, 2) and agg["protocols"]["a"]["train_minutes"].mean == 1.0


def test_markdown_has_every_claim_and_section():
    text = markdown(results([0.2] * 3, [0.3] * 3))
    for claim in CLAIMS:
        assert f"**{claim.id}**" in text
    for part in ("![WER vs executed compute](results/wer_vs_compute.png)", "## Verdict rule", "## Corpus",
                 "| train | 1.5 | 900 |", "## Runs", "## Every budget", "## Deviations from the papers",
                 report.DEVIATIONS[0], "not run yet", "| 12 | 5.1 |"):
        assert part in text


def selector_run(seed, choices):
    """A selector run on 3 layers: ``choices`` is ``{label: (distinct masks, top mask, share)}``."""
    selector = run("selector", seed, {label: 0.3 for label in ("k=3", "k=2", "k=1", "n=2", "n=1")})
    for row in selector["budgets"]:
        if row["budget"] in choices:
            row.update(zip(("distinct_masks", "top_mask", "top_mask_share"), choices[row["budget"]]))
    return selector


def test_selector_choice_table_shows_how_input_conditioned_the_masks_are():
    data = results([0.2] * 3, [0.3] * 3)
    assert report.selector_choice_table(data) == ""  # no selector run records its choices yet
    data["runs"] += [selector_run(0, {"k=2": (1, "011", 1.0), "n=2": (1, "011", 1.0), "k=1": (1, "010", 1.0),
                                      "n=1": (1, "001", 1.0)}),
                     selector_run(1, {"k=2": (3, "110", 0.5), "n=2": (1, "110", 1.0)}),
                     selector_run(2, {})]  # recorded before the choices were: no row
    table = report.selector_choice_table(data)
    lines = table.splitlines()
    assert "| seed | k=2 | k=1 |" in lines
    # seed 0: one fixed mask per k, the evenly spaced one at k = 2 (not at k = 1: another mask);
    # seed 1: three masks, whatever the spaced row ran.
    assert "| 0 | 1 · 011 · 100 % · *spaced* | 1 · 010 · 100 % |" in lines
    assert "| 1 | 3 · 110 · 50 % |  |" in lines
    assert not any(line.startswith("| 2 |") for line in lines)
    text = markdown(data)
    assert table in text and "| masks | top mask % |" in text
    assert "| selector | k=2 | 30.00 ± 0.00 (3) |" in text and "| 2.0 ± 1.4 | 75.0 ± 35.4 |" in text


def test_markdown_says_how_each_run_was_timed():
    data = results([0.2] * 3, [0.3] * 3)  # runs without a timing stamp: an earlier scheme
    assert "6 runs timed each budget's repeats back to back" in markdown(data)
    stamp = {"scheme": "interleaved", "utterances": 200, "repeats": 3}
    data["runs"] = [{**run, "timing": stamp} for run in data["runs"][:5]] + data["runs"][5:]
    text = markdown(data)
    assert "5 runs on the first 200 test utterances, each batch's fastest of 3 runs, the runs interleaved" in text
    assert "1 run timed each budget's repeats back to back" in text


@pytest.mark.parametrize("speedups, expected", [([1.10, 1.12, 1.09], "reproduced"),
                                                 ([1.10, 0.95, 1.02], "inconclusive")])
def test_blank_skip_speed_is_judged_within_each_run(speedups, expected):
    # Real-time factors of different sessions differ far more than blank skipping saves; the
    # claim reads each run's own ratio to its full-depth row.
    claim = next(c for c in CLAIMS if c.id == "blank-skip-speed")
    runs = [{"method": "blank_skip", "protocol": "blank_skip", "seed": seed, "epochs": 3, "budgets": [
        {"budget": "full", "wer": 0.5, "executed": 1.0, "rtf": rtf, "speedup": 1.0},
        {"budget": "tau=0.9", "wer": 0.5, "executed": 1.0, "rtf": rtf / speedup, "speedup": speedup}]}
        for seed, (rtf, speedup) in enumerate(zip([0.002, 0.004, 0.006], speedups))]
    result = verdict(claim, {"corpus": {}, "runs": runs})
    assert result.verdict == expected and result.stat_b.mean == 1.0
    assert result.stat_a.mean == pytest.approx(sum(1 / s for s in speedups) / 3)


def test_markdown_names_the_runs_whose_training_was_timed_again():
    data = results([0.2] * 3, [0.3] * 3)
    assert "Timed again" not in markdown(data)
    data["runs"][1]["training_timed_again"] = True
    assert "in a later session, for a run to start from it or to measure it again: a seed 1." in markdown(data)


def test_every_timing_scheme_the_recipe_stamps_is_described():
    from recipes.synthetic_speech.reproduce import TIMING_SCHEME

    assert TIMING_SCHEME in report.TIMING_SCHEMES


def test_engine_table_averages_the_seeds_that_report_engines():
    lm = {"order": 3, "weights": [0.5, 1.0]}
    data = {"runs": [run("a", 0, {"n=2": 0.5}, wer_by_engine={"espeak": 0.2, "flite": 0.9}, wer_lexicon=0.3,
                         wer_lm=0.25, lm_weight=1.0, lm=lm),
                     run("a", 1, {"n=2": 0.5}, wer_by_engine={"espeak": 0.4, "flite": 1.0},  # no lexicon WER
                         wer_lm=0.35, lm_weight=0.5, lm=lm),
                     run("a", 2, {"n=2": 0.5}),  # from before wer_by_engine: left out
                     run("b", 0, {"n=2": 0.5})]}
    table = report.engine_table(data)
    assert f"| protocol | seeds | espeak | flite | {report.LEXICON_COLUMN} | {report.LM_COLUMN} |" in table
    assert "| a | 2 | 30.0 ± 14.1 | 95.0 ± 7.1 | 30.0 | 30.0 ± 7.1 |" in table
    assert "| b |" not in table
    assert "No run reports" in report.engine_table({"runs": [run("b", 0, {"n=2": 0.5})]})
    text = markdown(data)
    assert "## Test WER by engine" in text
    assert "3-gram language model" in text and "[0.5, 1.0]" in text and "0.5 in 1 run, 1.0 in 1 run" in text
    assert "training transcripts only" in text
    grammar = {**lm, "grammar_sentences": 200_000}
    text = markdown({"runs": [run("a", 0, {"n=2": 0.5}, wer_by_engine={"espeak": 0.2}, wer_lm=0.25, lm_weight=1.0,
                                  lm=grammar)]})
    assert "training transcripts and 200,000 more sentences of the corpus grammar" in text
    assert "no run is scored with one yet" in markdown({"runs": [run("b", 0, {"n=2": 0.5})]})


def test_engine_section_names_the_beam_sizes():
    runs = [run("a", seed, {"n=2": 0.5}, lexicon_beam=beam) for seed, beam in enumerate((128, 128, 32))]
    assert "restricted to the corpus vocabulary (beam 128), no language model" in markdown({"runs": runs[:2]})
    assert "(beam 32 in 1 run or 128 in 2 runs)" in markdown({"runs": runs})
    assert "corpus vocabulary, no language model" in markdown({"runs": [run("b", 0, {"n=2": 0.5})]})


def test_report_links_are_relative_to_the_report(tmp_path):
    docs = tmp_path / "docs"
    assert report.relative_to_report(docs / "results-v2" / "wer.png", docs / "results-v2.md") == "results-v2/wer.png"
    assert report.relative_to_report(docs / "wer.png", docs / "sub" / "r.md") == "../wer.png"
    text = markdown(results([0.2, 0.3, 0.25], [0.3]), "results-v2/wer.png", "results-v2/results.json")
    assert "![WER vs executed compute](results-v2/wer.png)" in text and "from `results-v2/results.json`" in text


def test_figure_is_written(tmp_path):
    data = results([0.2, 0.3, 0.25], [0.3], label="n=2 random")
    path = tmp_path / "fig" / "wer_vs_compute.png"
    figure(data, path)
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"runs": [{"protocol": "a", "seed": 0,
                                                                       "budgets": [{"budget": "n=2"}]}]})],
                         ids=["missing", "not-json", "no-wer"])
def test_cli_error_is_one_line_naming_the_file(tmp_path, capsys, content):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "--results", str(path), "--out", str(tmp_path / "r.md")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m recipes.synthetic_speech report: error: ") and len(error.splitlines()) == 1 and str(path) in error
    assert not (tmp_path / "r.md").exists()


def test_cli_as_a_module_exits_2_without_traceback(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("[]")
    done = subprocess.run([sys.executable, "-m", "recipes.synthetic_speech", "report", "--results", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(path) in done.stderr


def test_cli_writes_markdown_and_figure(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results([0.2] * 3, [0.3] * 3)))
    out, png = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results" / "wer.png"
    assert cli.main(["report", "--results", str(path), "--out", str(out), "--figure", str(png)]) == 0
    assert "![WER vs executed compute](results/wer.png)" in out.read_text() and png.stat().st_size > 0
