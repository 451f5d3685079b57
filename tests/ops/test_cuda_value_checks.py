"""The CUDA registration of every op checks index / cu_seqlens / max_seqlen values (the
Triton launchers trust them) unless the caller vouches for them, as the encoder does for the
tensors it builds. Run on CPU tensors: the checks raise before any kernel launches."""
import importlib

import pytest
import torch

import dynenc
from dynenc import validation
from dynenc.ops.registry import CUDA_KERNELS, OPS

I32 = torch.int32


def _cu(*bounds):
    return torch.tensor(bounds, dtype=I32)


BAD_VALUES = [
    pytest.param("gather_rows", lambda: (torch.randn(4, 3), torch.tensor([0, 4])), "index must hold rows in",
                 id="gather_index_out_of_range"),
    pytest.param("scatter_rows", lambda: (torch.randn(2, 3), torch.tensor([1, 1]), 4), "distinct",
                 id="scatter_duplicate_index"),
    pytest.param("gated_residual_scatter", lambda: (torch.randn(4, 3), torch.randn(2, 3), None, torch.tensor([-1, 2])),
                 "index must hold rows in", id="gated_negative_index"),
    pytest.param("varlen_attention", lambda: (*(torch.randn(6, 1, 4),) * 3, _cu(0, 2, 6), 3, 0.5),
                 "max_seqlen must be >= the longest sequence", id="attention_max_seqlen_too_small"),
    pytest.param("varlen_attention", lambda: (*(torch.randn(6, 1, 4),) * 3, _cu(0, 2, 6), 4, 0.5, torch.randn(3, 1),
                                              torch.zeros(5, dtype=torch.long), torch.rand(6, 1),
                                              torch.tensor([0, 1, 0, 1, 2, 3])),
                 "positions must lie in", id="attention_position_out_of_range"),
    pytest.param("varlen_attention", lambda: (*(torch.randn(6, 1, 4),) * 3, _cu(0, 2, 6), 4, 0.5, torch.randn(3, 1),
                                              torch.tensor([0, 1, 3, 1, 0]), torch.rand(6, 1),
                                              torch.tensor([0, 1, 0, 1, 2, 2])),
                 "bias_buckets must lie in", id="attention_bucket_out_of_range"),
    pytest.param("varlen_dwconv1d", lambda: (torch.randn(6, 3), _cu(0, 4, 5), torch.randn(3, 3), None),
                 "cu_seqlens must start at 0", id="dwconv_cu_seqlens_short"),
    pytest.param("build_plan", lambda: (torch.ones(2, 6, dtype=torch.bool), _cu(1, 6)),
                 "cu_seqlens must start at 0", id="plan_cu_seqlens_start"),
    pytest.param("build_plan", lambda: (torch.ones(2, 6, dtype=torch.bool), _cu(0, 4, 2, 6)),
                 "never decrease", id="plan_cu_seqlens_decreasing"),
]


@pytest.mark.parametrize("name,args,match", BAD_VALUES)
def test_direct_cuda_calls_check_values(name, args, match):
    with pytest.raises(ValueError, match=match):
        CUDA_KERNELS[name](*args())


@pytest.mark.parametrize("name,args,match", BAD_VALUES)
def test_trusted_callers_skip_the_value_checks(name, args, match, monkeypatch):
    """Inside trusted_inputs() the value checks (a host sync each) are not run."""
    launched = []  # the launch itself is not under test
    monkeypatch.setattr(importlib.import_module(f"dynenc.kernels.{OPS[name]}"), name, lambda *a: launched.append(name))
    with validation.trusted_inputs():
        CUDA_KERNELS[name](*args())
    assert launched == [name]


def test_every_op_has_a_cuda_kernel_behind_checks():
    assert set(CUDA_KERNELS) == set(OPS)


def test_the_encoder_vouches_for_its_own_indices(monkeypatch, backend):
    """A forward (indexed routes, pack/unpack) runs no value check: no host sync per op."""
    calls = []
    for check in ("check_index_values", "check_cu_seqlens_values"):
        monkeypatch.setattr(validation, check, lambda *a, check=check, **k: calls.append(check))
    model = dynenc.DynamicConformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=3, depthwise_conv_kernel_size=3)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    model.eval()(torch.randn(2, 7, 16), torch.tensor([7, 4]), layer_mask=mask)
    assert calls == []
    dynenc.ops.gather_rows(torch.randn(3, 2), torch.tensor([0, 2]))  # a direct call is checked
    assert calls == (["check_index_values"] if dynenc.current_backend() == "reference" else [])
