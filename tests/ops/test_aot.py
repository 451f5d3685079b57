"""Ahead-of-time compilation of every Triton launch (``dynenc.kernels.aot_calls``), exactly as
the JIT specialises it, for sm_80 / sm_86 / sm_89 / sm_90 / gfx90a, with resource limits
checked: ``python -m dynenc.kernels.report`` in a subprocess without ``TRITON_INTERPRET``
(the interpreter cannot compile), so no GPU is needed.

The test runs ``--subset`` (each kernel's heaviest fp32 variant per arch, ~2 minutes on two
cores); the full matrix (fp32/bf16/fp16, head dims 36/64/128, kernel sizes 15/31) is the
report command without ``--subset`` (~10 minutes).
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("dynenc.kernels")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from dynenc.kernels.report import ARCHS  # noqa: E402
from dynenc.kernels.specialization import specialization_key  # noqa: E402

REPORT_KEYS = {"kernel", "variant", "arch", "registers", "spills", "shared", "warps", "stages", "problems"}


def _jit_kernels():
    """Every ``@triton.jit`` object of the package named ``*_kernel`` (helpers are inlined)."""
    jit_types = (triton.JITFunction, InterpretedFunction)
    modules = [importlib.import_module(f"{kernels.__name__}.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
    return {obj for m in modules for obj in vars(m).values() if isinstance(obj, jit_types)
            and obj.__name__.endswith("_kernel")}


@pytest.mark.parametrize("arch", ARCHS)
def test_aot_calls_cover_every_kernel_and_bind(arch):
    calls = kernels.aot_calls(arch)
    assert _jit_kernels() <= {call.kernel for call in calls}
    for call in calls:
        specialization_key(call, arch)  # binds like a launch: raises on a missing or unknown argument


def test_report_subset_compiles_within_limits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "dynenc.kernels.report", "--subset"], env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    broken = [row for row in rows if row["problems"]]
    assert proc.returncode == 0 and not broken, "\n".join(map(json.dumps, broken)) + proc.stderr[-4000:]
    assert all(REPORT_KEYS <= set(row) for row in rows)
    names = {kernel.__name__ for kernel in _jit_kernels()}
    assert {(row["kernel"], row["arch"]) for row in rows} == {(name, arch) for name in names for arch in ARCHS}
    slowest = max(rows, key=lambda row: row["seconds"])
    print(f"{len(rows)} launches in {sum(row['seconds'] for row in rows):.0f}s "
          f"(slowest {slowest['kernel']}[{slowest['variant']}] on {slowest['arch']}: {slowest['seconds']}s)")
