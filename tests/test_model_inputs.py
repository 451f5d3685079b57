"""Bad input raises a clear Python exception naming the argument."""
import pytest
import torch

import dynenc


@pytest.fixture(scope="module")
def model():
    return dynenc.DynamicConformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=3,
                                   depthwise_conv_kernel_size=3).eval()


X = torch.randn(2, 5, 16)
LENGTHS = torch.tensor([5, 3])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input=torch.randn(5, 16)), ValueError, "input must be a"),
    (dict(input=torch.randn(2, 5, 15)), ValueError, "input must be a"),
    (dict(input=torch.ones(2, 5, 16, dtype=torch.int64)), TypeError, "input must be a floating"),
    (dict(input=torch.randn(2, 0, 16), lengths=torch.tensor([1, 1])), ValueError, "at least one"),
    (dict(lengths=torch.tensor([5, 3, 2])), ValueError, "lengths must be a 1-D tensor of 2"),
    (dict(lengths=torch.tensor([[5, 3]])), ValueError, "lengths must be a 1-D"),
    (dict(lengths=torch.tensor([6, 3])), ValueError, r"lengths must lie in \[1, T=5\]"),
    (dict(lengths=torch.tensor([0, 3])), ValueError, r"lengths must lie in \[1, T=5\]"),
    (dict(lengths=torch.tensor([-1, 3])), ValueError, r"lengths must lie"),
    (dict(lengths=torch.tensor([5.0, 3.0])), TypeError, "lengths must be an integer"),
    (dict(lengths=torch.tensor([5, 3], device="meta")), ValueError, "lengths must be on the input's device"),
    (dict(layer_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"layer_mask must be a bool tensor of shape \(2, 3\)"),
    (dict(layer_mask=torch.ones(2, 3)), ValueError, "layer_mask must be a bool"),
    (dict(layer_mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "layer_mask must be on"),
    (dict(depth=torch.tensor([4, 1])), ValueError, r"depth must lie in \[0, num_layers=3\]"),
    (dict(depth=torch.tensor([-1, 1])), ValueError, "depth must lie"),
    (dict(depth=torch.tensor([1.0, 1.0])), ValueError, "depth must be an integer"),
    (dict(depth=torch.tensor([1, 1]), layer_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "at most one"),
    (dict(gates=torch.ones(2, 2)), ValueError, "gates must be a float tensor"),
])
def test_bad_input_names_the_argument(model, kwargs, error, match):
    args = dict(input=X, lengths=LENGTHS)
    args.update(kwargs)
    input, lengths = args.pop("input"), args.pop("lengths")
    with pytest.raises(error, match=match):
        model(input, lengths, **args)


def test_even_kernel_size_rejected():
    with pytest.raises(ValueError, match="depthwise_conv_kernel_size must be odd"):
        dynenc.DynamicConformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=1, depthwise_conv_kernel_size=4)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        dynenc.DynamicConformer(input_dim=15, num_heads=2, ffn_dim=32, num_layers=1, depthwise_conv_kernel_size=3)


@pytest.mark.parametrize("call,match", [
    (lambda: dynenc.ops.gather_rows(torch.randn(4, 3), torch.tensor([0, 1], dtype=torch.int32)), "index must be a 1-D int64"),
    (lambda: dynenc.ops.gated_residual_scatter(torch.randn(4, 3), torch.randn(2, 2)), "y must match x"),
    (lambda: dynenc.ops.gated_residual_scatter(torch.randn(4, 3), torch.randn(2, 3), torch.ones(3)), "gate must be 1-D with 2"),
    (lambda: dynenc.ops.varlen_dwconv1d(torch.randn(4, 3), torch.tensor([0, 4]), torch.randn(3, 3)), "cu_seqlens must be a non-empty 1-D int32"),
    (lambda: dynenc.ops.varlen_dwconv1d(torch.randn(4, 3), torch.tensor([0, 4], dtype=torch.int32), torch.randn(3, 2)), "K odd"),
    (lambda: dynenc.ops.build_plan(torch.ones(2, 4), torch.tensor([0, 4], dtype=torch.int32)), "row_mask must be a 2-D bool"),
])
def test_op_argument_checks(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("index", [[0, 4], [-1, 2], [1, 1]])
def test_native_rejects_bad_indices(index):
    """Out-of-range, negative and duplicate indices raise in the C++ path (no OOB access)."""
    x, y = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="index"):
        dynenc.ops.gated_residual_scatter(x, y, None, torch.tensor(index))
    with pytest.raises(RuntimeError, match="index"):
        dynenc.ops.scatter_rows(y, torch.tensor(index), 4)
