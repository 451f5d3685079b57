"""Random torchaudio Conformers, their DynamicConformer twins and the per-sample oracle loop
(shared by the model, ops and GPU tests)."""
import torch
import torchaudio

import dynenc

CONFIGS = {
    "bn_attn_first": dict(input_dim=32, num_heads=4, ffn_dim=64, num_layers=3, depthwise_conv_kernel_size=7),
    "gn_conv_first": dict(input_dim=36, num_heads=3, ffn_dim=40, num_layers=2, depthwise_conv_kernel_size=5,
                          use_group_norm=True, convolution_first=True),
    "bn_conv_first_odd": dict(input_dim=30, num_heads=5, ffn_dim=47, num_layers=2, depthwise_conv_kernel_size=3,
                              convolution_first=True),
    "gn_wide_kernel": dict(input_dim=20, num_heads=2, ffn_dim=33, num_layers=2, depthwise_conv_kernel_size=31,
                           use_group_norm=True),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial norms (affine params, BatchNorm running statistics) so parity tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def torchaudio_pair(config: dict, seed: int = 0):
    """(torchaudio Conformer, DynamicConformer with the same weights), both in eval mode."""
    torch.manual_seed(seed)
    reference = randomize_(torchaudio.models.Conformer(**config), seed).eval()
    return reference, dynenc.DynamicConformer.from_torchaudio(reference).eval()


def per_sample_loop(reference, input, lengths, layer_mask):
    """Oracle: each utterance alone, unpadded, through only its active torchaudio layers."""
    out = torch.zeros_like(input)
    for b, length in enumerate(lengths.tolist()):
        x = input[b, :length].unsqueeze(1)  # [T, 1, D]
        for layer_id, layer in enumerate(reference.conformer_layers):
            if layer_mask[b, layer_id]:
                x = layer(x, None)
        out[b, :length] = x[:, 0]
    return out
