#!/usr/bin/env bash
# The wheel as a user gets it: build dynenc's sdist from the files git sees, build the wheel
# from that sdist WITH build isolation (pip puts the pinned torch and ninja in the build env,
# so `pip install .` works on a machine with nothing installed), install the wheel with only its
# core dependencies into a fresh venv outside the checkout, and from another directory run a
# small DynamicConformer on the C++ backend, checking that dynenc, its C++ extension dynenc._C
# and py.typed come from the installed wheel, and that the wheel holds no tests.
#
# Usage: .ci/wheel_check.sh (from anywhere; needs .venv from `make install` for the sdist).
# PYTHON picks the interpreter of the fresh venv (default python3), TORCH_PIN the torch it gets.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.14.1}"
work="$(mktemp -d "${TMPDIR:-/tmp}/dynenc-wheel-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
stamp() { echo "wheel check: $1 ($((SECONDS - start)) s)"; }

# 1. The sdist, from a copy of the files git sees (tracked and untracked-not-ignored): no build/,
#    egg-info or in-place _C*.so of the checkout can leak into it.
mkdir -p "$work/src" "$work/dist"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done \
    | tar --null -T - -cf -) | tar -C "$work/src" -xf -
"$repo/.venv/bin/python" -m build --sdist --no-isolation --outdir "$work/dist" "$work/src" >"$work/sdist.log" 2>&1 \
    || { tail -30 "$work/sdist.log"; exit 1; }
sdist="$(ls "$work"/dist/dynenc-*.tar.gz)"
stamp "built $(basename "$sdist")"

# 2. The wheel from the sdist, with build isolation; meanwhile (the build env installs a torch
#    too: both are mostly unpacking) a fresh venv outside the checkout gets torch.
"$PYTHON" -m venv "$work/venv"
{ "$work/venv/bin/python" -m pip install -q --upgrade pip &&
  "$work/venv/bin/python" -m pip install -q --no-compile "$TORCH_PIN"; } >"$work/install.log" 2>&1 &
venv_job=$!
"$repo/.venv/bin/python" -m pip wheel -q --no-deps --wheel-dir "$work/dist" "$sdist" >"$work/wheel.log" 2>&1 \
    || { tail -30 "$work/wheel.log"; wait "$venv_job" || true; exit 1; }
wheel="$(ls "$work"/dist/dynenc-*.whl)"
stamp "built $(basename "$wheel")"

# 3. The wheel with its core dependencies only (nothing else is in the venv).
wait "$venv_job" || { tail -30 "$work/install.log"; exit 1; }
"$work/venv/bin/python" -m pip install -q "$wheel" "$TORCH_PIN" >>"$work/install.log" 2>&1 \
    || { tail -30 "$work/install.log"; exit 1; }
stamp "installed into $work/venv"

# 4. From elsewhere: the installed package, not the checkout, runs on the C++ backend.
cd "$work"
# (torch warns that numpy is missing: the core install has no numpy, and needs none.)
export PYTHONWARNINGS="ignore:Failed to initialize NumPy" KINETO_LOG_LEVEL=5
REPO="$repo" WHEEL="$wheel" "$work/venv/bin/python" - <<'EOF'
import importlib.metadata
import os
import sys
import zipfile
from pathlib import Path

import torch

import dynenc

repo, venv = Path(os.environ["REPO"]).resolve(), Path(sys.prefix).resolve()
names = zipfile.ZipFile(os.environ["WHEEL"]).namelist()
tests = [n for n in names if Path(n).name.startswith("test_") or Path(n).name == "conftest.py" or "/suites/" in n]
assert not tests, f"the wheel holds test files: {tests}"
assert "dynenc/py.typed" in names, "the wheel has no dynenc/py.typed"
assert any(n.startswith("dynenc/_C.") and n.endswith(".so") for n in names), "the wheel has no dynenc/_C*.so"
assert dynenc.__version__ == importlib.metadata.version("dynenc"), (dynenc.__version__, "!= the wheel's version")


def installed(path) -> Path:
    path = Path(path).resolve()
    assert path.is_relative_to(venv) and not path.is_relative_to(repo), f"{path} is not from the installed wheel"
    return path


package = installed(dynenc.__file__).parent
extension = installed(dynenc._C.__file__)
import dynenc.kernels  # noqa: E402  (kernels/, mapped in as dynenc.kernels; triton comes with torch)

assert installed(dynenc.kernels.__file__).parent == package / "kernels"
assert (package / "py.typed").is_file()
# The shared object this process mapped is the installed one.
maps = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "dynenc/_C." in line]
assert maps and all(Path(m).resolve() == extension for m in maps), maps

model = dynenc.DynamicConformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=3,
                                depthwise_conv_kernel_size=3).eval()
x, lengths = torch.randn(3, 11, 16), torch.tensor([11, 6, 1])
depth = torch.tensor([3, 1, 2])
with torch.no_grad():
    with dynenc.use_backend("native"):
        assert dynenc.current_backend() == "native"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, out_lengths = model(x, lengths, depth=depth)
    with dynenc.use_backend("reference"):
        expected, _ = model(x, lengths, depth=depth)
ran = sorted({e.key for e in prof.key_averages() if e.key.startswith("dynenc::")})
for op in ("dynenc::varlen_attention", "dynenc::varlen_dwconv1d", "dynenc::add_layer_norm"):
    assert op in ran, f"{op} did not run (ran {ran})"
    # Its only CPU kernel is the extension's C++ one (no Python fallback).
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
assert out.shape == x.shape and torch.equal(out_lengths, lengths)
torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
print(f"wheel check: dynenc {dynenc.__version__} from {package}, dynenc._C from {extension.name}, "
      f"ran {len(ran)} dynenc ops on the C++ backend ({', '.join(ran)}); matches the reference backend")
EOF
"$work/venv/bin/dynenc" --help >/dev/null
stamp "OK"
