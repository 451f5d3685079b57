"""`dynenc bench --modes latency` at tiny sizes: its rows and ratios exist and are finite, the
exported graphs compute what dynenc computes, the fit's weights are a least-squares fit, and
nothing reaches stderr (torch.onnx's registry, ONNX Runtime's quantizer)."""
import json
import math

import pytest

from dynenc import bench
from dynenc.bench.figures import latency
from dynenc.cli import main


def test_latency_quick_rows_and_ratios(tmp_path, capfd):
    assert main(["bench", "--quick", "--no-progress", "--modes", "latency", "--devices", "cpu",
                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["case"]: r for r in payload["rows"]}
    assert set(rows) == {case.name for case in bench.FIGURES["latency"].cases(bench.QUICK)}
    assert {r["peer"] for r in rows.values()} == {"dynenc", "onnxruntime-fp32", "onnxruntime-int8", "eager"}
    for row in rows.values():
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row["case"]
        if row["peer"] == "onnxruntime-fp32":  # the same function as dynenc's n-layer budget
            assert row["info"]["max_abs_diff"] < 1e-3, row["case"]
    layers = bench.QUICK.model.num_layers
    for frames in latency.frames(bench.QUICK):
        seconds = latency.seconds_label(frames)
        for threads in latency.THREADS:
            assert rows[f"dynenc full {seconds} t={threads}"]["info"]["active"] == pytest.approx(1.0)
            assert rows[f"dynenc n=1 {seconds} t={threads}"]["info"]["active"] == pytest.approx(1 / layers)
            assert 1 <= rows[f"dynenc exit τ {seconds} t={threads}"]["info"]["exit_depth"] <= layers
            assert 0 < rows[f"dynenc blank skip τ {seconds} t={threads}"]["info"]["skipped"] < 1

    ratios = {(r["figure"], r["name"]): r for r in payload["ratios"]}
    expected = {(ratio.figure, ratio.name) for ratio in bench.FIGURES["latency"].ratios(bench.QUICK)}
    assert set(ratios) == expected
    for ratio in ratios.values():
        assert math.isfinite(ratio["measured"]), ratio["name"]
        assert ratio["unit"] == ("ms" if ratio["name"].endswith(")") else ""), ratio["name"]
        if ratio["unit"] == "":
            assert ratio["measured"] > 0, ratio["name"]
    group = f"latency {latency.seconds_label(latency.frames(bench.QUICK)[0])} t=2"
    assert ratios[(group, "fixed ms / call (a of a + b*n)")]["met"] in (True, False)
    assert ratios[(group, "fixed ms / layer (b - matmuls)")]["target"] == latency.LAYER_TARGET_MS
    assert ratios[(group, f"dynenc full / ort fp32 n={layers}")]["target"] == latency.RATIO_TARGET
    out, err = capfd.readouterr()
    assert "cpu:latency" in out and "fixed ms / call" in out and " ms" in out
    assert err == "", err


def test_least_squares_weights_fit_a_line():
    xs = [1, 2, 4, 6, 8]
    w_a, w_b = latency.least_squares(xs)
    ys = [2.5 + 0.75 * x for x in xs]
    assert sum(w * y for w, y in zip(w_a, ys)) == pytest.approx(2.5)
    assert sum(w * y for w, y in zip(w_b, ys)) == pytest.approx(0.75)


def test_default_run_budgets():
    """At the bench config: budgets full, n=6/4/2/1, selector k=4, threshold exit, blank skip;
    ORT graphs for n=8/6/4/2 (the full run: the same); exits 2/4/6, blank skip at 3."""
    config = bench.BenchConfig()
    model = latency.model_config(config)
    assert (model.exit_depths, model.blank_skip_depth, model.selector_hidden) == ((2, 4, 6), 3, 64)
    assert list(latency.budgets(config)) == ["full", "n=6", "n=4", "n=2", "n=1", "selector k=4", "exit τ",
                                             "blank skip τ"]
    assert latency.onnx_layers(config) == latency.onnx_layers(bench.FULL) == [8, 6, 4, 2]
    assert latency.fit_layers(config) == [8, 6, 4, 2, 1]
