"""Triton kernels (``dynenc.kernels``) against ``dynenc.reference``.

Without a GPU the kernels run on CPU tensors in the Triton interpreter, which must be enabled
before the ``@triton.jit`` functions are defined, hence before ``dynenc.kernels`` is imported.
On a CUDA machine they run compiled on the GPU (set ``TRITON_INTERPRET=1`` to interpret there).
Outputs come from ``torch.empty``; deterministic mode fills those with NaN, so a row a kernel
forgets to write fails the comparison. References run in float64 on the CPU.

The AOT tests compile every kernel of ``aot_specs()`` for sm_80, sm_90 and gfx90a in a
subprocess (the interpreter cannot compile), so they need no GPU either.
"""
import importlib
import inspect
import json
import math
import os
import pkgutil
import subprocess
import sys
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import dynenc.kernels as kernels  # noqa: E402  (after TRITON_INTERPRET)
from dynenc import reference  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETED = isinstance(kernels.gated_scatter._row_merge_kernel, InterpretedFunction)
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_runnable_kernels = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="dynenc.kernels was imported before TRITON_INTERPRET=1 was set (e.g. by another test module), "
    "so its kernels are compiled-only and there is no GPU: run this file on its own",
)
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# float64 attention: the interface's scale and logsumexp are fp32, so ~1e-7 relative.
ATTENTION_TOLERANCES = {
    torch.float64: dict(atol=1e-6, rtol=1e-6),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}
DTYPES = [torch.float32, torch.float16, torch.float64] + ([] if INTERPRETED else [torch.bfloat16])  # no bf16 in numpy


@pytest.fixture(autouse=True)
def _nan_filled_empty():
    """torch.empty returns NaN (floats) / max int while deterministic algorithms are on."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def rand(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def f64(*tensors):
    """CPU float64 copies that require grad (None stays None)."""
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in tensors]


def assert_close(actual, expected, tol):
    """Compare on the CPU in float64; NaN (an unwritten ``torch.empty`` row) never matches."""
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().double(), **tol)


def reference_grads(fn, inputs, grad_out):
    """``torch.autograd.grad`` of a float64 reference w.r.t. the inputs that are not None."""
    leaves = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(fn(*inputs), leaves, grad_out.cpu().double(), materialize_grads=True))
    return [None if t is None else next(grads) for t in inputs]


def batch_id(lengths):
    return f"B{len(lengths)}-N{sum(lengths)}-min{min(lengths)}"


def cu_seqlens_of(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)


# Many short sequences, empty ones included: exercises the bisection over cu_seqlens.
MANY_LENGTHS = (0, 3, 6, 1, 0, 5, 2, 2, 0, 4, 6, 1, 3, 0, 0, 5, 1, 2, 6, 3, 4, 0, 1, 2, 5)


# ----------------------------------------------------------------------------- row ops
# (N, D, M, index kind): odd D; D > 512 loops over two BLOCK_D chunks; all / no rows active.
ROW_CASES = [(37, 13, 11, "random"), (20, 600, 7, "random"), (9, 5, 9, "random"), (9, 5, 0, "random"),
             (16, 3, 6, "prefix"), (1, 1, 1, "prefix"), (4, 3, 0, "prefix")]


def row_inputs(case, dtype, gate_kind, seed=0):
    num_rows, dim, num_active, index_kind = case
    gen = torch.Generator().manual_seed(seed)
    x, y = rand(num_rows, dim, dtype=dtype, gen=gen), rand(num_active, dim, dtype=dtype, gen=gen)
    index = None if index_kind == "prefix" else torch.randperm(num_rows, generator=gen)[:num_active].to(DEVICE)
    gate = {
        "none": None,
        "soft": torch.rand(num_active, generator=gen).to(dtype),
        "hard": (torch.rand(num_active, generator=gen) > 0.5).to(dtype),
        "soft_fp32": torch.rand(num_active, generator=gen),  # rounded to x's dtype by the op
    }[gate_kind]
    return x, y, None if gate is None else gate.to(DEVICE), index


@needs_runnable_kernels
@pytest.mark.parametrize("gate_kind", ["soft", "hard", "soft_fp32", "none"])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: "N{}-D{}-M{}-{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual_scatter(dtype, case, gate_kind):
    x, y, gate, index = row_inputs(case, dtype, gate_kind)
    out = kernels.gated_residual_scatter(x, y, gate, index)
    assert out.shape == x.shape and out.dtype == x.dtype
    index_cpu = None if index is None else index.cpu()
    assert_close(out, reference.gated_residual_scatter(*f64(x, y, gate), index_cpu), TOLERANCES[dtype])


@needs_runnable_kernels
@pytest.mark.parametrize("gate_kind", ["soft", "soft_fp32", "none"])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: "N{}-D{}-M{}-{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual_scatter_backward(dtype, case, gate_kind):
    x, y, gate, index = row_inputs(case, dtype, gate_kind)
    grad_out = rand(*x.shape, dtype=dtype, gen=torch.Generator().manual_seed(1))
    grad_x, grad_y, grad_gate = kernels.gated_residual_scatter_backward(grad_out, x, y, gate, index)
    index_cpu = None if index is None else index.cpu()
    expected = reference_grads(lambda *t: reference.gated_residual_scatter(*t, index_cpu), f64(x, y, gate), grad_out)
    assert_close(grad_x, expected[0], TOLERANCES[dtype])
    assert_close(grad_y, expected[1], TOLERANCES[dtype])
    assert grad_gate.shape == (y.shape[0],)
    if gate is None:
        assert grad_gate.dtype == x.dtype and not grad_gate.any()
    else:
        assert grad_gate.dtype == gate.dtype  # reduced in opmath, rounded to the gate's dtype
        assert_close(grad_gate, expected[2], max(TOLERANCES[dtype], TOLERANCES[gate.dtype], key=lambda t: t["atol"]))


@needs_runnable_kernels
@pytest.mark.parametrize("case", [c for c in ROW_CASES if c[3] == "random"], ids=lambda c: "N{}-D{}-M{}".format(*c[:3]))
@pytest.mark.parametrize("dtype", DTYPES + [torch.int64], ids=str)  # exact copies: any dtype
def test_gather_scatter_rows(dtype, case):
    x, y, _, index = row_inputs(case, dtype, "none")
    assert torch.equal(kernels.gather_rows(x, index).cpu(), reference.gather_rows(x.cpu(), index.cpu()))
    num_rows = x.shape[0]
    assert torch.equal(kernels.scatter_rows(y, index, num_rows).cpu(),
                       reference.scatter_rows(y.cpu(), index.cpu(), num_rows))


# ----------------------------------------------------------------------------- dwconv
# Zero-length sequences, T = 1, B = 1, a sequence longer than a row tile, odd C > BLOCK_C.
CONV_CASES = [((5, 0, 40, 1, 3), 7, 5), ((1,), 3, 1), ((0, 9, 0), 70, 31), ((70,), 5, 3), (MANY_LENGTHS, 4, 7)]


def conv_inputs(case, dtype, seed=0):
    lengths, channels, kernel_size = case
    gen = torch.Generator().manual_seed(seed)
    cu_seqlens = cu_seqlens_of(lengths)
    num_rows = int(sum(lengths))
    return (rand(num_rows, channels, dtype=dtype, gen=gen), cu_seqlens,
            rand(channels, kernel_size, dtype=dtype, gen=gen), rand(channels, dtype=dtype, gen=gen))


@needs_runnable_kernels
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{batch_id(c[0])}-C{c[1]}-K{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_dwconv1d(dtype, case, with_bias):
    x, cu_seqlens, weight, bias = conv_inputs(case, dtype)
    bias = bias if with_bias else None
    out = kernels.varlen_dwconv1d(x, cu_seqlens, weight, bias)
    x64, weight64, bias64 = f64(x, weight, bias)
    expected = reference.varlen_dwconv1d(x64, cu_seqlens.cpu(), weight64, bias64)
    assert_close(out, expected, TOLERANCES[dtype])


@needs_runnable_kernels
@pytest.mark.parametrize("programs", [None, 2], ids=["default_grid", "multi_tile_programs"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{batch_id(c[0])}-C{c[1]}-K{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_dwconv1d_backward(dtype, case, programs, monkeypatch):
    if programs:  # few row groups: each program reduces several row tiles into its partials
        monkeypatch.setattr(kernels.dwconv, "TARGET_PROGRAMS", programs)
    x, cu_seqlens, weight, bias = conv_inputs(case, dtype)
    grad_out = rand(*x.shape, dtype=dtype, gen=torch.Generator().manual_seed(1))
    grads = kernels.varlen_dwconv1d_backward(grad_out, x, cu_seqlens, weight)
    cu_cpu = cu_seqlens.cpu()
    expected = reference_grads(lambda x_, w_, b_: reference.varlen_dwconv1d(x_, cu_cpu, w_, b_),
                               f64(x, weight, bias), grad_out)
    for got, want in zip(grads, expected):
        assert_close(got, want, TOLERANCES[dtype])


# ----------------------------------------------------------------------------- attention
# Multi-block sequences (> 64 rows, exact multiples of 64), T = 1, zero lengths, Dh padded to 16 /
# not a power of two, Dh > 64 (32-row blocks, 128-wide head tiles).
ATTENTION_CASES = [((5, 0, 70, 1, 3), 2, 12), ((1,), 1, 16), ((33, 20), 3, 8), ((40, 0), 1, 80),
                   ((3, 64, 129, 0, 128), 1, 16), (MANY_LENGTHS, 2, 4)]


def attention_inputs(case, dtype, seed=0):
    lengths, heads, head_dim = case
    gen = torch.Generator().manual_seed(seed)
    num_rows = int(sum(lengths))
    q, k, v = (rand(num_rows, heads, head_dim, dtype=dtype, gen=gen) for _ in range(3))
    return q, k, v, cu_seqlens_of(lengths), max(lengths), 1.0 / math.sqrt(head_dim)


def reference_logsumexp(q, k, cu_seqlens, scale):
    lse = torch.empty(q.shape[:2], dtype=q.dtype)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("thd,shd->hts", q[start:end], k[start:end]) * scale
        lse[start:end] = scores.logsumexp(-1).T
    return lse


@needs_runnable_kernels
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"{batch_id(c[0])}-H{c[1]}-Dh{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_attention(dtype, case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, dtype)
    out, lse = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    q64, k64, v64 = f64(q, k, v)
    cu_cpu = cu_seqlens.cpu()
    assert_close(out, reference.varlen_attention(q64, k64, v64, cu_cpu, scale), ATTENTION_TOLERANCES[dtype])
    assert_close(lse, reference_logsumexp(q64, k64, cu_cpu, scale), ATTENTION_TOLERANCES[torch.float32])


@needs_runnable_kernels
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"{batch_id(c[0])}-H{c[1]}-Dh{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_attention_backward(dtype, case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, dtype)
    out, lse = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    grad_out = rand(*q.shape, dtype=dtype, gen=torch.Generator().manual_seed(1))
    grads = kernels.varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    cu_cpu = cu_seqlens.cpu()
    expected = reference_grads(lambda *t: reference.varlen_attention(*t, cu_cpu, scale), f64(q, k, v), grad_out)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        assert_close(got, want, ATTENTION_TOLERANCES[dtype])


# ----------------------------------------------------------------------------- plan
@needs_runnable_kernels
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize(
    "lengths,num_layers",
    [((5, 0, 40, 1, 3), 3), ((1,), 1), ((0,), 2), ((3, 4), 0), ((1500, 0, 7), 2), (MANY_LENGTHS, 4)],
    ids=["ragged", "T1", "empty_seq", "no_layers", "multi_block", "many_seqs"],
)
def test_build_plan(lengths, num_layers, density):
    gen = torch.Generator().manual_seed(0)
    cu_seqlens = cu_seqlens_of(lengths)
    row_mask = (torch.rand(num_layers, int(sum(lengths)), generator=gen) < density).to(DEVICE)
    got = kernels.build_plan(row_mask, cu_seqlens)
    want = reference.build_plan(row_mask.cpu(), cu_seqlens.cpu())
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w)


# ----------------------------------------------------------------------------- interface
OPS = ["gated_residual_scatter", "gated_residual_scatter_backward", "gather_rows", "scatter_rows", "varlen_dwconv1d",
       "varlen_dwconv1d_backward", "varlen_attention", "varlen_attention_backward", "build_plan"]


@pytest.mark.parametrize("name", OPS)
def test_launcher_signature_matches_op_schema(name):
    """dynenc.ops calls the launchers positionally with the op's arguments."""
    schema = getattr(torch.ops.dynenc, name).default._schema
    assert list(inspect.signature(getattr(kernels, name)).parameters) == [a.name for a in schema.arguments]


BAD_CALLS = {
    "y_dtype": lambda: kernels.gated_residual_scatter(torch.zeros(4, 3), torch.zeros(2, 3).double(), None, None),
    "index_dtype": lambda: kernels.gather_rows(torch.zeros(4, 3), torch.tensor([0, 1], dtype=torch.int32)),
    "even_kernel": lambda: kernels.varlen_dwconv1d(torch.zeros(4, 3), torch.tensor([0, 4], dtype=torch.int32),
                                                   torch.zeros(3, 4), None),
    "lse_dtype": lambda: kernels.varlen_attention_backward(*[torch.zeros(4, 1, 8)] * 5, torch.zeros(4, 1).double(),
                                                           torch.tensor([0, 4], dtype=torch.int32), 4, 1.0),
    "mask_dtype": lambda: kernels.build_plan(torch.zeros(2, 4), torch.tensor([0, 4], dtype=torch.int32)),
}


@pytest.mark.parametrize("call", list(BAD_CALLS))
def test_launchers_reject_bad_inputs(call):
    """Shape/dtype errors raise RuntimeError (like the C++ ops' TORCH_CHECK) before any launch."""
    with pytest.raises(RuntimeError):
        BAD_CALLS[call]()


# ----------------------------------------------------------------------------- AOT compile
AOT_TARGETS = {"cuda-sm80": ("cuda", 80, 32), "cuda-sm90": ("cuda", 90, 32), "hip-gfx90a": ("hip", "gfx90a", 64)}

# Runs without TRITON_INTERPRET (it cannot compile); prints one JSON line per spec. The specs
# of the target's backend are the variants its launchers compile at run time.
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


@pytest.mark.parametrize("target", list(AOT_TARGETS), ids=list(AOT_TARGETS))
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
