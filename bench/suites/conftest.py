"""pytest-benchmark suites over the cases of ``dynenc bench`` (defined once, in
:mod:`dynenc.bench.figures`).

Run: ``.venv/bin/python -m pytest bench/suites --benchmark-only [--benchmark-json out.json]``
(``--benchmark-disable``: each case once, untimed, as a test). Options: ``--bench-quick``
(tiny sizes, a smoke run), ``--bench-full`` (every case, as ``dynenc bench --full``),
``--bench-device cuda``. A test module lists the figures it covers in ``FIGURES``; every
case of those figures becomes one benchmark, grouped by figure, with the case's facts in
``extra_info``.

This directory is not a package (no ``__init__.py``), so the wheel leaves it out; the
suites import the installed :mod:`dynenc.bench`.
"""
import pytest
import torch

from dynenc.bench import FULL, QUICK, BenchConfig, Workload, all_cases, synchronize


def pytest_addoption(parser):
    group = parser.getgroup("dynenc bench")
    group.addoption("--bench-quick", action="store_true", help="tiny sizes (smoke run)")
    group.addoption("--bench-full", action="store_true", help="every case (dynenc bench --full)")
    group.addoption("--bench-device", default="cpu", help="device of the benchmarks (default cpu)")


def _config(pytest_config) -> BenchConfig:
    if pytest_config.getoption("--bench-quick"):
        return QUICK
    return FULL if pytest_config.getoption("--bench-full") else BenchConfig()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = all_cases(_config(metafunc.config), metafunc.module.FIGURES)
        metafunc.parametrize("case", [pytest.param(case, id=case.key) for case in cases])


@pytest.fixture(scope="session")
def workload(pytestconfig) -> Workload:
    device = torch.device(pytestconfig.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda needs CUDA")
    return Workload(_config(pytestconfig), device)


@pytest.fixture
def run_case(benchmark, workload):
    """Time one case: micro-benchmarks with pytest-benchmark's calibration, model cases
    with the run's repeats after its warm-up rounds (they take up to seconds each)."""

    def run(case):
        if not case.runs_on(workload.device):
            pytest.skip(f"{case.key} does not run on {workload.device}")
        prepared = case.build(workload)
        benchmark.group = f"{workload.device.type}:{case.figure}"
        benchmark.extra_info.update(peer=case.peer, **prepared.info)

        def call():
            prepared.run()
            synchronize(workload.device)

        config = workload.config
        if prepared.repeat_inside:
            benchmark(call)
        else:
            benchmark.pedantic(call, rounds=config.repeats, warmup_rounds=config.warmup)

    return run
