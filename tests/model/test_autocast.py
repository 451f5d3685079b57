"""Autocast regions run through every dynenc op (CPU bf16 here; CUDA fp16/bf16 marked gpu)."""
import pytest
import torch

import dynenc

# bf16 keeps 8 bits of mantissa: outputs of a few layers stay within ~1e-2 of fp32.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _run(device, dtype, training, backend):
    torch.manual_seed(0)
    model = dynenc.DynamicConformer(input_dim=32, num_heads=4, ffn_dim=64, num_layers=3,
                                    depthwise_conv_kernel_size=7).to(device).train(training)
    input = torch.randn(3, 20, 32, device=device)
    lengths = torch.tensor([20, 13, 7], device=device)
    layer_mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.bool, device=device)
    with dynenc.use_backend(backend):
        reference, _ = model(input, lengths, layer_mask=layer_mask)
        with torch.autocast(device, dtype=dtype):
            output, _ = model(input, lengths, layer_mask=layer_mask)
            loss = output.float().square().mean()
    loss.backward()
    assert (output.float() - reference).abs().max().item() < TOLERANCE[dtype]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cpu_bf16_autocast(training, backend):
    _run("cpu", torch.bfloat16, training, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cuda_autocast(dtype, training):
    _run("cuda", dtype, training, "native")


@pytest.mark.parametrize("op,args,expected", [
    pytest.param("varlen_attention", lambda: (torch.randn(5, 2, 8),) * 3 + (torch.tensor([0, 5], dtype=torch.int32),
                                                                            5, 0.35), torch.bfloat16, id="attention_lowers"),
    pytest.param("varlen_dwconv1d", lambda: (torch.randn(5, 4), torch.tensor([0, 5], dtype=torch.int32),
                                             torch.randn(4, 3), None), torch.bfloat16, id="dwconv_lowers"),
    pytest.param("gated_residual_scatter", lambda: (torch.randn(5, 4), torch.randn(2, 4).bfloat16(), None, None),
                 torch.float32, id="row_ops_promote"),
])
def test_registered_autocast_policy(op, args, expected):
    """Direct ``torch.ops.dynenc`` calls get the same autocast policy as the public functions."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = getattr(torch.ops.dynenc, op)(*args())
    assert (out[0] if isinstance(out, tuple) else out).dtype == expected
