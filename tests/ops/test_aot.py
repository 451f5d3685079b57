"""Ahead-of-time compilation of every Triton kernel (``dynenc.kernels.aot_specs()``) for sm_80,
sm_90 and gfx90a, in a subprocess without ``TRITON_INTERPRET`` (the interpreter cannot
compile), so no GPU is needed."""
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time

import pytest

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("dynenc.kernels")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

AOT_TARGETS = {"cuda-sm80": ("cuda", 80, 32), "cuda-sm90": ("cuda", 90, 32), "hip-gfx90a": ("hip", "gfx90a", 64)}

# Prints one JSON line per spec. The specs of the target's backend are the variants its
# launchers compile at run time.
_AOT_SCRIPT = """
import json, sys, time, traceback
import triton
from triton.backends.compiler import GPUTarget
import dynenc.kernels as kernels
target = GPUTarget(*json.loads(sys.argv[1]))
binary = "cubin" if target.backend == "cuda" else "hsaco"
for name, fn, signature, constexprs in kernels.aot_specs(target.backend):
    start = time.perf_counter()
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=target)
        error = None if compiled.asm.get(binary) else "no " + binary
    except Exception:
        error = traceback.format_exc(limit=3)
    print(json.dumps(dict(name=name, seconds=time.perf_counter() - start, error=error)), flush=True)
"""


def _jit_kernels():
    """Every ``@triton.jit`` object of the package named ``*_kernel`` (helpers are inlined)."""
    jit_types = (triton.JITFunction, InterpretedFunction)
    modules = [importlib.import_module(f"{kernels.__name__}.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
    return {obj for m in modules for obj in vars(m).values() if isinstance(obj, jit_types)
            and obj.__name__.endswith("_kernel")}


def test_aot_specs_cover_every_kernel():
    specs = kernels.aot_specs()
    covered = {fn for _, fn, _, _ in specs}
    assert _jit_kernels() <= covered, sorted(k.__name__ for k in _jit_kernels() - covered)
    for name, fn, signature, constexprs in specs:
        assert list(signature) == list(fn.arg_names), name
        assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs), name


@pytest.mark.parametrize("target", list(AOT_TARGETS))
def test_aot_compile(target, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache hit
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(AOT_TARGETS[target])], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(kernels.aot_specs(AOT_TARGETS[target][0])), proc.stdout[-4000:] + proc.stderr[-4000:]
    failures = {r["name"]: r["error"] for r in results if r["error"]}
    assert not failures, "\n".join(f"{name}:\n{error}" for name, error in failures.items())
    slowest = max(results, key=lambda r: r["seconds"])
    print(f"{target}: {len(results)} kernels in {time.perf_counter() - start:.1f}s "
          f"(slowest {slowest['name']} {slowest['seconds']:.1f}s)")
