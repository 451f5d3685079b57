"""The launchers compile one Triton variant per model configuration, not per batch shape:
data-dependent ints are ``do_not_specialize`` and the head dim is a constexpr. Counted with
the JIT's own cache key (``dynenc.kernels.specialization``), with no GPU: launches are
recorded, not run."""
import collections

import pytest
import torch

kernels = pytest.importorskip("dynenc.kernels")
from dynenc.kernels.specialization import KernelCall, specialization_key  # noqa: E402


@pytest.fixture
def recorded(monkeypatch):
    """kernel name -> set of the JIT cache keys its launches would use."""
    keys = collections.defaultdict(set)
    for module in (kernels._utils, *kernels.MODULES.values()):
        for kernel in [obj for name, obj in vars(module).items() if name.endswith("_kernel")]:
            def record(*args, grid, warmup, kernel=kernel, **kwargs):
                keys[kernel.__name__].add(specialization_key(KernelCall(kernel, "", args, kwargs)))
            monkeypatch.setattr(kernel, "run", record)
    return keys


def _ragged_batches(count=12, seed=0):
    """cu_seqlens of ``count`` batches with varying sizes, lengths and total rows."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        lengths = torch.randint(0, 150, (1 + 3 * i,), generator=gen)
        yield torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)


def test_attention_compiles_once_per_dtype_and_head_dim(recorded):
    configs = [(dtype, head_dim) for dtype in (torch.float32, torch.float16) for head_dim in (36, 64)]
    for dtype, head_dim in configs:
        for cu_seqlens in _ragged_batches():
            rows = int(cu_seqlens[-1])
            q = torch.randn(rows, 4, head_dim).to(dtype)
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            out, lse = kernels.launcher("varlen_attention")(q, q, q, cu_seqlens, max_seqlen, 0.125)
            kernels.launcher("varlen_attention_backward")(q, q, q, q, out, lse, cu_seqlens, max_seqlen, 0.125)
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_delta_kernel"):
        assert len(recorded[name]) == len(configs), name


def test_dwconv_compiles_once_per_dtype_and_kernel_size(recorded):
    configs = [(dtype, size) for dtype in (torch.float32, torch.float16) for size in (15, 31)]
    for dtype, size in configs:
        weight, bias = torch.randn(64, size).to(dtype), torch.randn(64).to(dtype)
        for cu_seqlens in _ragged_batches():
            x = torch.randn(int(cu_seqlens[-1]) + 1, 64).to(dtype)
            kernels.launcher("varlen_dwconv1d")(x, cu_seqlens, weight, bias)
            kernels.launcher("varlen_dwconv1d_backward")(x, x, cu_seqlens, weight)
    assert len(recorded["_dwconv_fwd_kernel"]) == len(configs)
    assert len(recorded["_dwconv_bwd_kernel"]) == len(configs)


def test_row_ops_compile_once_per_case(recorded):
    for cu_seqlens in _ragged_batches():
        rows = int(cu_seqlens[-1]) + 1
        x = torch.randn(rows, 96)
        index = torch.randperm(rows)[: rows // 2 + 1]
        y, gate = torch.randn(index.numel(), 96), torch.rand(index.numel())
        kernels.launcher("gather_rows")(x, index)
        kernels.launcher("scatter_rows")(y, index, rows)
        kernels.launcher("gated_residual_scatter")(x, y, gate, index)
        kernels.launcher("gated_residual_scatter")(x, y, None, None)
        kernels.launcher("gated_residual_scatter_backward")(x, x, y, gate, index)
    assert len(recorded["_gather_rows_kernel"]) == 1
    assert len(recorded["_row_merge_kernel"]) == 3  # scatter, gated with index, ungated prefix
    assert len(recorded["_gated_scatter_bwd_kernel"]) == 1
    assert len(recorded["_inverse_index_kernel"]) == 1


def test_add_layer_norm_compiles_once_per_dtype_and_width(recorded):
    configs = [(dtype, dim) for dtype in (torch.float32, torch.float16) for dim in (96, 144)]
    for dtype, dim in configs:
        weight = torch.randn(dim).to(dtype)
        for cu_seqlens in _ragged_batches():
            x = torch.randn(int(cu_seqlens[-1]) + 1, dim).to(dtype)
            stats = torch.zeros(x.shape[0])
            kernels.launcher("add_layer_norm")(x, x, 0.5, weight, weight, 1e-5)
            kernels.launcher("add_layer_norm_backward")(x, x, x, stats, stats, weight, 0.5)
    assert len(recorded["_add_layer_norm_fwd_kernel"]) == len(configs)
    assert len(recorded["_add_layer_norm_bwd_kernel"]) == len(configs)
