"""The structure checks of the conversions: an upstream transformer layer dynenc cannot
represent raises ``ValueError`` naming the first difference instead of converting silently."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

LAYER_CHILDREN = ("attention", "dropout", "layer_norm", "feed_forward", "final_layer_norm")


def _check_attention(attention: Any, where: str) -> None:
    if all(
        isinstance(getattr(attention, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj", "out_proj")
    ):
        return
    mha = getattr(attention, "attention", None)
    if isinstance(mha, nn.MultiheadAttention):
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{where}.attention has key/value biases or separate key/value sizes, which dynenc lacks")
        return
    raise ValueError(
        f"{where}.attention must have q_proj, k_proj, v_proj and out_proj linears (or torchaudio WavLM's inner "
        f"nn.MultiheadAttention), got {type(attention).__name__}"
    )


def check_transformer_layers(layers: Sequence[Any], where: str, pre_norm_of: Callable[[Any], bool]) -> bool:
    """Check that every layer has the submodules a :class:`DynamicTransformerLayer` adopts and
    one LayerNorm placement; returns it (True = pre-LN)."""
    if not layers:
        raise ValueError(f"{where} is empty: a dynamic model needs at least one layer")
    placements = {pre_norm_of(layer) for layer in layers}
    if len(placements) != 1:
        raise ValueError(f"{where} mixes pre-LN and post-LN layers, which one DynamicTransformer cannot represent")
    for i, layer in enumerate(layers):
        here = f"{where}[{i}]"
        children = [name for name, _ in layer.named_children()]
        if children != list(LAYER_CHILDREN):
            extra = sorted(set(children) - set(LAYER_CHILDREN))
            missing = [name for name in LAYER_CHILDREN if name not in children]
            detail = f"extra {extra}" if extra else f"missing {missing}"
            if "adapter_layer" in extra:
                detail += " (HF's adapter_attn_dim adapters are not supported)"
            raise ValueError(f"{here} has submodules {children}, expected {list(LAYER_CHILDREN)}: {detail}")
        _check_attention(layer.attention, here)
        for name in ("intermediate_dense", "output_dense"):
            if not isinstance(getattr(layer.feed_forward, name, None), nn.Linear):
                raise ValueError(f"{here}.feed_forward has no {name} linear, got {type(layer.feed_forward).__name__}")
        for name in ("layer_norm", "final_layer_norm"):
            if not isinstance(getattr(layer, name), nn.LayerNorm):
                raise ValueError(f"{here}.{name} must be an nn.LayerNorm, got {type(getattr(layer, name)).__name__}")
    return placements.pop()
