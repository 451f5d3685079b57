"""Launch decisions of the CUDA attention path, as pure functions (no GPU needed)."""
import pytest
import torch

attention = pytest.importorskip("dynenc.kernels.attention")


@pytest.mark.parametrize("dtype,head_dim,arch,flash", [
    (torch.float16, 64, "sm_80", True),
    (torch.bfloat16, 128, "sm_90", True),
    (torch.bfloat16, 256, "sm_86", True),
    (torch.float16, 36, "sm_90", False),   # not a multiple of 8
    (torch.float16, 264, "sm_90", False),  # above FlashAttention-2's 256
    (torch.float16, 64, "sm_75", False),   # FlashAttention-2 needs sm_80
    (torch.float32, 64, "sm_90", False),
    (torch.float64, 64, "sm_90", False),
    (torch.float16, 64, "gfx90a", False),
    (torch.float16, 64, None, False),      # CPU tensors: the interpreter
])
def test_half_precision_goes_to_flash_attention(dtype, head_dim, arch, flash):
    assert attention.uses_flash_attention(dtype, head_dim, arch) is flash


@pytest.mark.parametrize("head_dim,padded", [(1, 16), (16, 16), (17, 32), (36, 64), (64, 64), (80, 128), (128, 128)])
def test_head_dim_is_padded_to_a_supported_tile(head_dim, padded):
    assert attention.padded_head_dim(head_dim) == padded


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90", "gfx90a", None])
@pytest.mark.parametrize("head_dim", [36, 64, 128])
def test_fp32_tiles_stay_within_the_register_budget(arch, head_dim):
    """3xTF32 splits operands into two registers each: fp32 tiles hold <= 2048 elements."""
    config = attention.attention_config(arch, torch.float32, head_dim)
    assert config.block * config.block_d <= 2048 and config.block >= 16
