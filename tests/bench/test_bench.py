"""`dynenc bench` and `dynenc profile` end to end at tiny sizes (the timings mean nothing
here; the outputs' structure does)."""
import dataclasses
import json
import re

import pytest
import torch

from dynenc import bench
from dynenc.bench.harness import Work, gpu_peak
from dynenc.cli import main
from dynenc.config import config_from_dict


def test_bench_quick_writes_json_and_png(tmp_path, capfd):
    assert main(["bench", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert {"machine", "config", "devices", "wall_s", "figure_s", "notes", "rows", "ratios"} <= set(payload)
    assert set(payload["figure_s"]) == {f"cpu:{figure}" for figure in bench.FIGURES}
    assert 0 < sum(payload["figure_s"].values()) <= payload["wall_s"]
    assert {"cpu", "torch_threads", "torch", "torchaudio", "triton", "dynenc_commit"} <= set(payload["machine"])
    assert payload["config"]["model"]["dim"] == bench.QUICK.model.dim
    assert config_from_dict(bench.BenchConfig, payload["config"], "bench.json") == bench.QUICK

    rows = {(r["figure"], r["case"]): r for r in payload["rows"]}
    expected = {(case.figure, case.name) for case in bench.all_cases(bench.QUICK) if case.runs_on(torch.device("cpu"))}
    assert set(rows) == expected
    assert {r["peer"] for r in payload["rows"]} >= {"torchaudio", "masked", "dynenc", "dynenc-reference", "eager"}
    for row in payload["rows"]:
        assert row["median_ms"] > 0 and len(row["times_ms"]) == bench.QUICK.repeats
    train = rows[("train", "dynenc LD f=0.50")]
    assert set(train["phases_ms"]) == {"fwd", "bwd"} and train["info"]["saved_mb"] > 0
    assert rows[("forward", "dynenc f=0.50")]["info"]["active"] == pytest.approx(0.5, abs=0.15)
    for compiled in ("torchaudio compiled", "dynenc compiled"):  # compile time kept out of the timings
        assert rows[("peers", compiled)]["info"]["compile_s"] > 0
    ratios = {r["name"] for r in payload["ratios"]}
    assert {"dynenc / torchaudio compiled", "dynenc / torchaudio bucketed x4"} <= ratios
    assert any(name.startswith("forward / its matmuls") for name in ratios)

    ratios = {r["name"]: r for r in payload["ratios"]}
    for name in ("dynenc f=0.50 / dynenc full", "dynenc full / torchaudio", "dynenc f=0.50 / torchaudio",
                 "dynenc LD f=0.50 step / dynenc full step", "dynenc LD f=0.50 saved activations / full",
                 "DLD step / (teacher fwd + full student step)", f"routing overhead / layer (D={bench.QUICK.op_dim})"):
        assert ratios[name]["measured"] > 0 and ratios[name]["met"] in (True, False)
    assert (tmp_path / "bench_cpu.png").stat().st_size > 10_000

    out, err = capfd.readouterr()
    assert "torch " in out and "dynenc f=0.50 / dynenc full" in out
    # Only the tables and the paths: no third-party warnings (dynamo's graph breaks while
    # compiling the peers, torch.onnx's registry, ONNX Runtime's quantizer), even at fd level.
    assert err == "", err


def _ratio_keys(config):
    keys = set()
    for figure in bench.FIGURES.values():
        for ratio in figure.ratios(config):
            keys.update(key for terms in (ratio.numerator, ratio.denominator)
                        for key, _ in bench.figures.weighted_terms(terms))
    return keys


@pytest.mark.parametrize("config", [pytest.param(bench.BenchConfig(), id="default"),
                                    pytest.param(bench.FULL, id="full"), pytest.param(bench.QUICK, id="quick")])
def test_every_ratio_has_its_cases(config):
    """No ratio of a run is silently dropped for want of a case the run left out."""
    assert _ratio_keys(config) <= {case.key for case in bench.all_cases(config)}


def test_default_run_is_the_full_run_less_its_secondary_cases():
    """Same sizes, fewer rounds; a subset of the full run's cases that keeps every figure and
    the headline ratios at the sizes the README quotes."""
    default, full = bench.BenchConfig(), bench.FULL
    assert dataclasses.replace(default, repeats=full.repeats, full=True) == full and default.repeats < full.repeats
    assert bench.QUICK.full  # the smoke run still runs every case
    default_cases, full_cases = ({c.key for c in bench.all_cases(config)} for config in (default, full))
    assert default_cases < full_cases
    assert {c.figure for c in bench.all_cases(default)} == set(bench.FIGURES)
    names = {ratio.name for figure in bench.FIGURES.values() for ratio in figure.ratios(default)}
    assert {f"dynenc f={f:.2f} / dynenc full" for f in (0.75, 0.5, 0.25)} <= names
    assert {"dynenc / torchaudio eager", "dynenc / torchaudio compiled", "dynenc / torchaudio bucketed x4",
            "forward / its matmuls (D=144 L=8 T=256)", "forward / its matmuls (D=256 L=12 T=400)",
            "train step / its matmuls fwd+bwd (D=144 L=8)", "ort fp32 / dynenc n=8 t=1", "ort int8 / fp32 n=4 t=2",
            "ort fp32 n=4 / n=8 t=2", "DLD step / (teacher fwd + full student step)",
            f"{'early exit, nobody exits'} / full", "routing overhead / layer (D=256)"} <= names
    targets = {r.name for f in bench.FIGURES.values() for r in f.ratios(full) if r.target is not None}
    assert targets - {"early exit @2 / (front-end + 2/8 encoder)", "early exit @6 / (front-end + 6/8 encoder)",
                      "blank skip 80% / (front-end + 0.60 encoder)"} <= names  # targets of left-out sweep points only


@pytest.mark.parametrize("flags, config", [pytest.param([], bench.BenchConfig(), id="default"),
                                           pytest.param(["--full"], bench.FULL, id="full"),
                                           pytest.param(["--quick"], bench.QUICK, id="quick")])
def test_bench_run_flags(flags, config):
    import argparse

    from dynenc.bench.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(flags)) == config
    with pytest.raises(SystemExit):
        parser.parse_args(["--quick", "--full"])


def test_bench_help_states_the_durations(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "minutes on 2 idle CPU cores" in out and "--full" in out and "2-3 minute" not in out


def test_pytest_benchmark_suites_run(tmp_path):
    """bench/suites (pytest-benchmark, outside the installed package) collect and run every
    case once at tiny sizes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert not (root / "bench" / "suites" / "__init__.py").exists()  # not a package: not in the wheel
    assert not list((root / "bench").glob("test_*.py")) and not (root / "bench" / "conftest.py").exists()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/suites",
                             "--bench-quick", "--benchmark-disable"], cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = len([c for c in bench.all_cases(bench.QUICK, ("forward", "train", "dld", "exits", "ops"))
                    if c.runs_on(torch.device("cpu"))])
    assert f"{expected} passed" in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("layers_flag", [pytest.param("--num-layers", id="model-config-name"),
                                         pytest.param("--layers", id="old-alias")])
def test_bench_modes_and_sizes(tmp_path, layers_flag):
    assert main(["bench", "--quick", "--no-progress", "--modes", "forward", "--fractions", "0.5",
                 layers_flag, "2", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["config"]["model"]["num_layers"] == 2 and payload["config"]["fractions"] == [1.0, 0.5]
    assert {r["figure"] for r in payload["rows"]} == {"forward"}


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--dim", "33"], r"dim \(33\) must be divisible by num_heads \(2\)", id="dim-not-divisible"),
    pytest.param(["--repeats", "0"], "--repeats must be >= 1", id="zero-repeats"),
])
def test_bench_rejects_bad_sizes(tmp_path, capsys, flags, message):
    """Bad sizes (checked by ModelConfig and BenchConfig) end the command with status 2 and
    a one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", *flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search(f"dynenc bench: error: .*{message}", capsys.readouterr().err)


def test_depths_for_fraction_hits_the_token_fraction():
    import torch

    generator = torch.Generator().manual_seed(0)
    lengths = bench.spread_lengths(16, 200, 0.3, generator)
    for fraction in (0.75, 0.5, 0.25):
        depth = bench.depths_for_fraction(lengths, 8, fraction, generator)
        assert depth.min() >= 1 and depth.max() <= 8 and len(set(depth.tolist())) > 1  # per-sample depths
        executed = float((depth * lengths).sum()) / (8 * float(lengths.sum()))
        assert executed == pytest.approx(fraction, abs=0.02)
    mask = bench.layer_drop_mask(16, 8, 0.5, generator)
    assert (mask.sum(1) == 4).all() and not (mask == mask[0]).all()


def test_peers_compute_the_same_function():
    """The benchmark compares equal work: on equal lengths (no padding to leak) the masked
    torchaudio peer equals dynenc with the same per-sample depths, and torchaudio equals
    dynenc at full depth."""
    import dataclasses

    import torch

    config = dataclasses.replace(bench.QUICK, min_length=1.0)
    workload = bench.Workload(config, torch.device("cpu"))
    static, dynamic = workload.models
    x, lengths = workload.input
    depth = workload.depth(0.5)
    with torch.inference_mode():
        masked = bench.masked_forward(static, x, lengths, bench.depth_mask(depth, config.model.num_layers))
        torch.testing.assert_close(dynamic(x, lengths, depth=depth)[0], masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dynamic(x, lengths)[0], static(x, lengths)[0], atol=1e-5, rtol=1e-5)


def test_profile_prints_dynenc_ops_and_writes_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--dim", "32", "--heads", "2", "--layers", "2", "--batch", "4", "--frames", "16",
                 "--kernel", "5", "--keep", "0.5", "--backward", "--out", str(trace)]) == 0
    out = capsys.readouterr().out
    for name in ("dynenc::gated_residual_scatter", "dynenc::gather_rows", "dynenc.layer0", "dynenc.plan"):
        assert name in out
    assert "dynenc::varlen_attention_backward" in out
    text = trace.read_text()
    assert "dynenc::gated_residual_scatter" in text and "dynenc.layer0" in text
    json.loads(text)  # a valid Chrome trace


def test_op_figure_covers_the_op_table():
    """Every forward op of dynenc.ops.OPS has a micro-benchmark, except scatter_rows (the
    inverse of gather_rows: the same traffic)."""
    import dynenc
    from dynenc.bench.figures.ops import OP_BENCHMARKS

    forward = {name for name in dynenc.ops.OPS if not name.endswith("_backward")}
    assert set(OP_BENCHMARKS) == forward - {"scatter_rows"}


def test_op_work_models_by_hand():
    """The least work credited to each op case, on 2 sequences of 2 and 4 rows (N = 6) at D = 4
    channels, 2 heads, fp32, whose LD route runs rows 0, 1 (M = 2); every implementation of an
    op is credited with the same work."""
    import dataclasses

    from dynenc.bench.figures.ops import OPS, cases

    config = dataclasses.replace(bench.QUICK, batch=2, frames=4, min_length=0.5, op_dim=4, seed=2)
    workload = bench.Workload(config, torch.device("cpu"))
    assert workload.input[1].tolist() == [2, 4] and workload.op_rows["route"].index.tolist() == [0, 1]
    works = {label: {build(workload).work for _, build in impls} for label, impls in OPS.items()}
    assert all(len(work) == 1 for work in works.values())
    # read 2 rows of 4 fp32 + 2 int64 indices, write 2 rows
    assert works["gather"] == {Work(bytes=2 * 16 + 2 * 8 + 2 * 16)}
    # read x (6 rows), y (2 rows), 2 fp32 gates, 2 indices; write 6 rows
    assert works["gated scatter"] == {Work(bytes=96 + 32 + 8 + 16 + 96)}
    # QK^T and PV: 2 * L^2 * Dh FLOPs each, per sequence and head; fp32 is held against the TF32 peak
    assert works["attention"] == {Work(flops=2 * 2 * (2 ** 2 + 4 ** 2) * 2 * 2, math="tf32")}
    torch_kernels = {case.name: case for case in cases(config) if case.peer == "torch"}
    varlen = torch_kernels["attention torch varlen_attn (bf16)"]
    assert not varlen.runs_on(torch.device("cpu"))  # CUDA only: skipped on CPU
    assert varlen.build(workload).work == Work(flops=320.0, math="bf16")  # built (not run) on CPU
    assert torch_kernels["gated scatter torch clone+index_copy_ (no gate)"].build(workload).work == Work(
        bytes=96 + 32 + 16 + 96)


def test_ops_quick_reports_throughput(tmp_path, capsys):
    """Every ops row reports one positive rate (GB/s or TFLOP/s); on CPU no fraction of peak."""
    assert main(["bench", "--quick", "--no-progress", "--modes", "ops", "--devices", "cpu", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = payload["rows"]
    assert {r["case"] for r in rows} >= {"gather eager index_select", "dwconv eager padded conv1d",
                                          "gated scatter torch clone+index_copy_ (no gate)"}
    assert "attention torch varlen_attn (bf16)" not in {r["case"] for r in rows}
    for row in rows:
        rates = [rate for rate in (row["gb_per_s"], row["tflop_per_s"]) if rate is not None]
        assert len(rates) == 1 and rates[0] > 0, row["case"]
        assert row["peak_fraction"] is None
    assert rows[0]["work"]["bytes"] > 0
    out = capsys.readouterr().out
    assert "throughput" in out and "GB/s" in out and "TFLOP/s" in out


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"), ("NVIDIA A10", "A10"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA A10G", None), ("NVIDIA L40", None), ("NVIDIA GeForce RTX 4090", None), (None, None),
])
def test_gpu_peak_lookup(name, peak):
    """Whole-token matches, the most specific entry wins; unknown devices get no peak."""
    found = gpu_peak(name)
    assert (found and found.name) == peak


def test_work_rates_against_a_peak():
    h100 = gpu_peak("NVIDIA H100 80GB HBM3")
    assert Work(bytes=670 * 10 ** 9).rates(0.5, h100) == pytest.approx(
        dict(gb_per_s=1340.0, tflop_per_s=None, peak_fraction=0.4))
    assert Work(flops=4.945e12, math="tf32").rates(0.1, h100) == pytest.approx(
        dict(gb_per_s=None, tflop_per_s=49.45, peak_fraction=0.1))
    assert Work(bytes=10 ** 9).rates(1.0, None)["peak_fraction"] is None
