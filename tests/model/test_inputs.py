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
    (dict(input=torch.randn(5, 16)), ValueError, "input must be 3-D"),
    (dict(input=[[1.0]]), TypeError, "input must be a torch.Tensor"),
    (dict(input=torch.randn(2, 5, 15)), ValueError, "input must be a"),
    (dict(input=torch.ones(2, 5, 16, dtype=torch.int64)), TypeError, "input must be a floating"),
    (dict(input=torch.randn(2, 0, 16), lengths=torch.tensor([1, 1])), ValueError, "at least one"),
    (dict(lengths=torch.tensor([5, 3, 2])), ValueError, "lengths must be a 1-D tensor of 2"),
    (dict(lengths=torch.tensor([[5, 3]])), ValueError, "lengths must be a 1-D"),
    (dict(lengths=torch.tensor([6, 3])), ValueError, r"lengths must lie in \[0, T=5\]"),
    (dict(lengths=torch.tensor([5.5, 3])), ValueError, r"lengths must lie in \[0, T=5\], got min 3 max 6"),
    (dict(lengths=torch.tensor([-1, 3])), ValueError, r"lengths must lie"),
    (dict(lengths=torch.tensor([True, False])), TypeError, "lengths must be an integer or floating tensor"),
    (dict(lengths=[5, 3]), TypeError, "lengths must be a torch.Tensor, got list"),
    (dict(lengths=torch.tensor([5, 3], device="meta")), ValueError, "lengths must be on cpu"),
    (dict(input=X.double()), TypeError, "input must have the model's dtype torch.float32"),
    (dict(input=X.bfloat16()), TypeError, "input must have the model's dtype torch.float32"),
    (dict(depth=[1, 2]), TypeError, "depth must be a torch.Tensor, got list"),
    (dict(layer_mask=[[True] * 3] * 2), TypeError, "layer_mask must be a torch.Tensor, got list"),
    (dict(gates=[[1.0] * 3] * 2), TypeError, "gates must be a torch.Tensor, got list"),
    (dict(policy=object()), TypeError, "policy must be a routing policy"),
    (dict(layer_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"layer_mask must be a bool tensor of shape \(2, 3\)"),
    (dict(layer_mask=torch.ones(2, 3)), TypeError, "layer_mask must have dtype bool"),
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


@pytest.mark.parametrize("kwargs,error,match", [
    pytest.param(dict(num_heads=0), ValueError, r"num_heads must be >= 1, got 0", id="zero_heads"),
    pytest.param(dict(depthwise_conv_kernel_size=-3), ValueError, "depthwise_conv_kernel_size must be >= 1", id="negative_kernel"),
    pytest.param(dict(num_layers=2.0), TypeError, "num_layers must be an int", id="float_layers"),
    pytest.param(dict(dropout=1.5), ValueError, r"dropout must lie in \[0, 1\)", id="dropout"),
])
def test_constructor_arguments(kwargs, error, match):
    config = dict(input_dim=16, num_heads=2, ffn_dim=32, num_layers=1, depthwise_conv_kernel_size=3)
    with pytest.raises(error, match=match):
        dynenc.DynamicConformer(**{**config, **kwargs})


def test_single_frame_batch_norm_in_training_is_a_clear_error():
    model = dynenc.DynamicConformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=3)
    mask = torch.tensor([[False, True], [True, True]])
    with pytest.raises(ValueError, match="BatchNorm1d in training needs more than one active frame"):
        model(X, torch.tensor([5, 1]), layer_mask=mask)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        dynenc.DynamicConformer(input_dim=15, num_heads=2, ffn_dim=32, num_layers=1, depthwise_conv_kernel_size=3)


@pytest.mark.parametrize("call,error,match", [
    pytest.param(lambda: dynenc.ops.gather_rows(torch.randn(4, 3), torch.tensor([0, 1], dtype=torch.int32)),
                 TypeError, "index must have dtype int64", id="index_dtype"),
    pytest.param(lambda: dynenc.ops.gated_residual_scatter(torch.randn(4, 3), torch.randn(2, 2)),
                 ValueError, "y must match x in dim 1", id="y_features"),
    pytest.param(lambda: dynenc.ops.gated_residual_scatter(torch.randn(4, 3), torch.randn(2, 3), torch.ones(3)),
                 ValueError, "gate must have 2 entries", id="gate_length"),
    pytest.param(lambda: dynenc.ops.varlen_dwconv1d(torch.randn(4, 3), torch.tensor([0, 4]), torch.randn(3, 3)),
                 TypeError, "cu_seqlens must have dtype int32", id="cu_seqlens_dtype"),
    pytest.param(lambda: dynenc.ops.varlen_dwconv1d(torch.randn(4, 3), torch.tensor([0, 4], dtype=torch.int32),
                                                    torch.randn(3, 2)), ValueError, "K odd", id="even_kernel"),
    pytest.param(lambda: dynenc.ops.build_plan(torch.ones(2, 4), torch.tensor([0, 4], dtype=torch.int32)),
                 TypeError, "row_mask must have dtype bool", id="row_mask_dtype"),
])
def test_op_argument_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("index", [[0, 4], [-1, 2], [1, 1]], ids=["too_large", "negative", "duplicate"])
def test_both_backends_reject_bad_indices(index, backend):
    """Out-of-range, negative and duplicate indices raise a ValueError on every backend (no OOB access)."""
    x, y = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="index"):
        dynenc.ops.gated_residual_scatter(x, y, None, torch.tensor(index))
    with pytest.raises(ValueError, match="index"):
        dynenc.ops.scatter_rows(y, torch.tensor(index), 4)
