"""``python -m recipes.synthetic_speech deploy``: a tiny checkpoint measured on a tiny tone corpus — a row per budget x
runtime x thread count, ONNX Runtime fp32 scoring like eager dynenc, int8 rows, the table and
the plot; bad input is one clear error.

One deploy run (two budgets, so two exports: the slow part) is shared by the tests."""
import json
import math

import pytest
import torch

from dynenc.asr import CTCModel, ModelConfig, save_checkpoint
from recipes.synthetic_speech.cli import main
from recipes.synthetic_speech.deploy import RUNTIMES, check_budgets, spread_by_length
from dynenc.asr.tokenizer import CharTokenizer

from tone_corpus import write_tone_corpus

# 2 layers: the default budgets are n = 2 and n = 1.
CONFIG = ModelConfig(vocab_size=CharTokenizer().vocab_size, num_features=80, dim=32, num_heads=2, ffn_dim=64,
                     num_layers=2, kernel_size=5, dropout=0.0)
TEXTS = {"test": ["go left", "stop now", "yes", "five six", "red door"]}
THREADS = (1, 2)
FP32_TOLERANCE = 1e-4  # log-probabilities, ONNX Runtime vs eager dynenc (the same graph semantics)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save_checkpoint(path, CTCModel(CONFIG).eval())
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tone_corpus(tmp_path_factory.mktemp("corpus"), TEXTS)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, checkpoint, corpus):
    """``python -m recipes.synthetic_speech deploy`` at the default budgets; the output directory."""
    out = tmp_path_factory.mktemp("deploy")
    assert main(["deploy", str(checkpoint), "--data", str(corpus), "--threads", *map(str, THREADS),
                 "--latency-utterances", "3", "--out", str(out), "--quiet"]) == 0
    return out


def test_a_row_per_budget_runtime_and_thread_count(deployed):
    results = json.loads((deployed / "deploy.json").read_text())
    keys = sorted((row["n"], row["runtime"], row["threads"]) for row in results["rows"])
    assert keys == sorted((n, runtime, t) for n in (2, 1) for runtime in RUNTIMES for t in THREADS)
    assert results["test_utterances"] == len(TEXTS["test"]) and results["latency_utterances"] == 3
    assert results["machine"]["cpu_count"] >= 1
    for row in results["rows"]:
        assert row["latency_ms"] > 0 and row["rtf"] > 0 and math.isfinite(row["wer"])
        assert row["executed_fraction"] == row["n"] / CONFIG.num_layers


def test_onnx_runtime_fp32_scores_like_eager_and_int8_runs(deployed):
    rows = {(row["n"], row["runtime"], row["threads"]): row
            for row in json.loads((deployed / "deploy.json").read_text())["rows"]}
    for n in (2, 1):
        eager, fp32, int8 = (rows[n, runtime, 1] for runtime in RUNTIMES)
        assert eager["max_abs_diff"] is None and eager["agreement"] is None  # the reference
        assert fp32["wer"] == eager["wer"] and fp32["agreement"] == 1.0
        assert fp32["max_abs_diff"] <= FP32_TOLERANCE
        assert math.isfinite(int8["wer"]) and math.isfinite(int8["max_abs_diff"]) and 0 <= int8["agreement"] <= 1
    assert (deployed / "onnx" / "n1.onnx").is_file() and (deployed / "onnx" / "n1.int8.onnx").is_file()


def test_table_and_plot_are_written(deployed):
    table = (deployed / "deploy.md").read_text().splitlines()
    assert "| budget (executed) | runtime | WER % | int8 ΔWER (pts) | 1 thread: ms (RTF) | 2 threads: ms (RTF) |" \
        in table[2]
    assert sum(line.startswith("| n=") for line in table) == 2 * len(RUNTIMES)
    assert (deployed / "deploy.png").stat().st_size > 1000


def test_default_budgets_are_fractions_of_the_depth():
    assert check_budgets(None, 8) == [8, 6, 4, 2]
    assert check_budgets(None, 2) == [2, 1] and check_budgets(None, 1) == [1]
    assert check_budgets([2, 4, 2], 8) == [4, 2]


@pytest.mark.parametrize("budgets", [[0], [9], [4, -1]])
def test_bad_budgets_are_a_value_error(budgets):
    with pytest.raises(ValueError, match=r"--budgets \(layers run\) must lie in \[1, 8\]"):
        check_budgets(budgets, 8)


def test_latency_subset_spreads_over_the_lengths():
    lengths = [50, 10, 40, 20, 30]
    assert spread_by_length(lengths, 3) == [1, 4, 0]  # shortest, middle, longest
    assert spread_by_length(lengths, 1) == [4] and sorted(spread_by_length(lengths, 9)) == list(range(5))


CLI_ERRORS = [
    pytest.param(lambda ckpt, data: [str(ckpt), "--data", str(data), "--budgets", "3"],
                 "--budgets (layers run) must lie in [1, 2], got 3", id="budget_above_depth"),
    pytest.param(lambda ckpt, data: [str(ckpt), "--data", str(data), "--budgets", "0"],
                 "--budgets (layers run) must lie in [1, 2], got 0", id="budget_zero"),
    pytest.param(lambda ckpt, data: [str(ckpt), "--data", str(data), "--threads", "0"], "--threads must be >= 1",
                 id="no_threads"),
    pytest.param(lambda ckpt, data: [str(ckpt.with_name("missing.pt")), "--data", str(data)], "does not exist",
                 id="missing_checkpoint"),
    pytest.param(lambda ckpt, data: [str(ckpt), "--data", str(data / "missing")], "not found", id="missing_data"),
]


@pytest.mark.parametrize("argv, message", CLI_ERRORS)
def test_cli_errors_are_one_line(checkpoint, corpus, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", *argv(checkpoint, corpus), "--out", str(tmp_path), "--quiet"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1
    assert error.startswith("python -m recipes.synthetic_speech deploy: error: ") and message in error, error
