"""Resource report of every Triton launch, compiled as the JIT would, for each GPU target.

    python -m dynenc.kernels.report [--arch sm_86 ...] [--subset]

Compiles :func:`dynenc.kernels.aot_calls` for each arch (no GPU needed; with the JIT's
alignment / divisibility attributes, see :mod:`dynenc.kernels.specialization`), prints one
JSON line per (kernel, variant, arch) with ``registers``, ``spills`` (bytes), ``shared``
(bytes), ``warps``, ``stages`` and ``problems``, and exits 1 when any launch breaks a limit:
shared memory above the arch's per-block limit, any spill (NVIDIA: ``ptxas -v`` of Triton's
bundled ptxas, spill store + load bytes; AMD: the hsaco's scratch bytes), or a compile error.
The full matrix takes several minutes on two cores; ``--subset`` compiles, per kernel and
arch, its heaviest fp32 variant only (what ``tests/ops/test_aot.py`` runs).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
import traceback

from triton import knobs

from . import aot_calls
from .specialization import KernelCall, compile_call

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "gfx90a")
# Per-block shared memory (LDS on AMD) a kernel may use.
SHARED_LIMITS = {"sm_80": 166_912, "sm_86": 101_376, "sm_89": 101_376, "sm_90": 232_448, "gfx90a": 65_536}


def _ptxas_resources(log: str) -> dict:
    """Registers and spill bytes from a ``ptxas -v`` log."""
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spills": int(spills.group(1)) + int(spills.group(2))}


def _hsaco_resources(amdgcn: str) -> dict:
    """VGPRs and scratch bytes from the kernel descriptor metadata of the AMDGCN assembly."""

    def field(name):
        return int(re.search(rf"^\s*\.{name}:\s*(\d+)", amdgcn, re.MULTILINE).group(1))

    return {"registers": field("vgpr_count"), "spills": field("private_segment_fixed_size")}


def measure(call: KernelCall, arch: str) -> dict:
    """Compile ``call`` for ``arch`` (never from Triton's cache, so ptxas runs) and read its resources."""
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its own ptxas -v run
        compiled = compile_call(call, arch)
    found = _ptxas_resources(log.getvalue()) if arch.startswith("sm_") else _hsaco_resources(compiled.asm["amdgcn"])
    return dict(found, shared=compiled.metadata.shared, warps=compiled.metadata.num_warps,
                stages=compiled.metadata.num_stages)


def problems(row: dict) -> list:
    """The limits ``row`` breaks."""
    broken = []
    if row["shared"] > SHARED_LIMITS[row["arch"]]:
        broken.append(f"shared {row['shared']} B > {SHARED_LIMITS[row['arch']]} B")
    if row["spills"]:
        broken.append(f"spills {row['spills']} B")
    return broken


def heaviest_fp32(calls: list) -> list:
    """Per kernel, its last fp32 call (the modules list head dims and kernel sizes ascending),
    or its last call when it has no fp32 variant."""
    chosen = {}
    for call in calls:
        if call.variant.startswith("float32") or not chosen.get(call.kernel, call).variant.startswith("float32"):
            chosen[call.kernel] = call
    return list(chosen.values())


def report(archs, subset: bool = False):
    """Yield one row per (kernel, variant, arch)."""
    for arch in archs:
        calls = aot_calls(arch)
        for call in heaviest_fp32(calls) if subset else calls:
            row = {"kernel": call.kernel.__name__, "variant": call.variant, "arch": arch}
            start = time.perf_counter()
            try:
                row.update(measure(call, arch))
                row["problems"] = problems(row)
            except Exception:  # a kernel that fails to compile is a broken row, not a crashed report
                row.update(registers=None, spills=None, shared=None, warps=None, stages=None,
                           problems=[traceback.format_exc(limit=3)])
            row["seconds"] = round(time.perf_counter() - start, 2)
            yield row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynenc.kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=ARCHS, help="target (repeatable; default: all)")
    parser.add_argument("--subset", action="store_true", help="only each kernel's heaviest fp32 variant per arch")
    args = parser.parse_args(argv)
    broken = 0
    for row in report(args.arch or ARCHS, args.subset):
        print(json.dumps(row), flush=True)
        broken += bool(row["problems"])
    if broken:
        print(f"{broken} launch(es) break a limit", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
