"""``DynamicConformer``: torchaudio's Conformer on packed rows with ragged per-sample and
per-frame depth.

Submodule and parameter names are those of ``torchaudio.models.Conformer`` so its state
dict loads with ``strict=True`` (the layer: :mod:`dynenc.layer`). Inside, every layer runs on
the packed ``[N, D]`` rows of the samples/frames its route selects; skipped (sample, layer)
pairs, padded frames and dropped frames are never computed.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from . import validation
from .engine import EncoderOutput, ExecutedWork, RoutedEncoder, RoutingPolicy, is_fully_sharded
from .layer import DynamicConformerLayer
from .padded import PaddedConformer

__all__ = ["DynamicConformer", "EncoderOutput", "ExecutedWork", "RoutingPolicy", "SKIP_MODES"]

SKIP_MODES = ("identity", "final_norm")


def _structure(layer: nn.Module) -> List[Tuple[str, str]]:
    """``(name, "Type(settings)")`` of every submodule of a layer, and its ``convolution_first``."""
    found = [(name, f"{type(module).__name__}({module.extra_repr()})") for name, module in layer.named_modules()]
    found[0] = ("", f"convolution_first={getattr(layer, 'convolution_first', None)}")
    return found


class DynamicConformer(RoutedEncoder):
    """Conformer encoder whose samples and frames take different depths in one batch.

    Same constructor and parameter names as ``torchaudio.models.Conformer``.

    Args:
        input_dim: D.
        num_heads: attention heads per layer.
        ffn_dim: feed-forward hidden dimension.
        num_layers: L.
        depthwise_conv_kernel_size: odd kernel size of the depthwise convolution.
        dropout: dropout probability.
        use_group_norm: GroupNorm (per sequence) instead of BatchNorm1d in the conv module.
        convolution_first: convolution module before self-attention.
        skip_mode: what a skipped (sample, layer) does: ``"identity"`` (default, our choice:
            nothing, it costs nothing) or ``"final_norm"`` (it still applies that layer's final
            LayerNorm, as the seed authors' layer-dropping code does; one extra LayerNorm per
            partially run layer). With a soft gate g, rows become ``base + g * (F(x) - base)``
            with ``base`` = x or ``final_layer_norm(x)``.
        checkpoint_layers: in training, recompute each executed layer in the backward instead
            of keeping its activations (``torch.utils.checkpoint``, non-reentrant); also an
            attribute a training recipe may set. Gradients are unchanged and BatchNorm's
            running statistics are updated once per step (not again by the recomputation).

    The packed forward is the routing engine's (:class:`dynenc.engine.RoutedEncoder`, which
    also documents the zero-row layer calls that keep DDP and FSDP2 ranks in step).
    """

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        depthwise_conv_kernel_size: int,
        dropout: float = 0.0,
        use_group_norm: bool = False,
        convolution_first: bool = False,
        skip_mode: str = "identity",
        checkpoint_layers: bool = False,
    ) -> None:
        super().__init__()
        if skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {skip_mode!r}")
        for name, value in (
            ("input_dim", input_dim),
            ("num_heads", num_heads),
            ("ffn_dim", ffn_dim),
            ("depthwise_conv_kernel_size", depthwise_conv_kernel_size),
        ):
            validation.check_int(name, value, low=1)
        validation.check_int("num_layers", num_layers, low=0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if input_dim % num_heads != 0:
            raise ValueError(f"input_dim ({input_dim}) must be divisible by num_heads ({num_heads})")
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.ffn_dim = ffn_dim
        self.kernel_size = depthwise_conv_kernel_size
        self.skip_mode = skip_mode
        self.checkpoint_layers = checkpoint_layers
        self.conformer_layers = nn.ModuleList(
            DynamicConformerLayer(
                input_dim,
                ffn_dim,
                num_heads,
                depthwise_conv_kernel_size,
                dropout=dropout,
                use_group_norm=use_group_norm,
                convolution_first=convolution_first,
            )
            for _ in range(num_layers)
        )

    @classmethod
    def from_torchaudio(cls, model: nn.Module) -> DynamicConformer:
        """A DynamicConformer with the configuration and weights of a ``torchaudio.models.Conformer``.

        Every layer is compared with a freshly built torchaudio ``ConformerLayer`` of the
        configuration read from layer 0 (submodule names, types and settings such as sizes,
        eps, dropout and activations, plus ``convolution_first``): a model this class cannot
        represent raises ``ValueError`` naming the first difference instead of converting
        silently.
        """
        from torchaudio.models.conformer import ConformerLayer

        layers = getattr(model, "conformer_layers", None)
        if not isinstance(model, nn.Module) or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise TypeError(
                f"model must be a torchaudio.models.Conformer (a module with a non-empty "
                f"conformer_layers ModuleList), got {type(model).__name__}"
            )
        extra = sorted(name for name, _ in model.named_children() if name != "conformer_layers")
        if extra:
            raise ValueError(
                f"model has submodules {extra} besides conformer_layers, which a DynamicConformer does not have"
            )
        first: Any = layers[0]  # duck-typed as a torchaudio ConformerLayer (its structure is checked below)
        try:
            config = dict(
                input_dim=first.self_attn.embed_dim,
                num_heads=first.self_attn.num_heads,
                ffn_dim=first.ffn1.sequential[1].out_features,
                num_layers=len(layers),
                depthwise_conv_kernel_size=first.conv_module.sequential[2].kernel_size[0],
                dropout=first.self_attn.dropout,
                use_group_norm=isinstance(first.conv_module.sequential[3], nn.GroupNorm),
                convolution_first=first.convolution_first,
            )
        except (AttributeError, IndexError, TypeError) as error:
            raise ValueError(f"model.conformer_layers[0] is not a torchaudio ConformerLayer: {error}") from error
        layer_config = {k: v for k, v in config.items() if k not in ("num_heads", "num_layers")}
        expected = _structure(ConformerLayer(num_attention_heads=config["num_heads"], **layer_config))
        for i, layer in enumerate(layers):
            found = _structure(layer)
            for (name, want), (got_name, got) in zip(expected, found):
                if (name, want) != (got_name, got):
                    got = got if got_name == name else f"submodule {got_name!r} {got}"
                    raise ValueError(
                        f"model.conformer_layers[{i}].{name or '(layer)'} differs from what a "
                        f"DynamicConformer of layer 0's configuration has: expected {want}, got {got}"
                    )
            if len(found) != len(expected):
                raise ValueError(f"model.conformer_layers[{i}] has {len(found)} submodules, expected {len(expected)}")
        dynamic = cls(**config)
        param = next(model.parameters())
        dynamic.to(device=param.device, dtype=param.dtype)
        dynamic.load_state_dict(model.state_dict(), strict=True)
        return dynamic

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: Tensor,
        lengths: Tensor,
        *,
        layer_mask: Optional[Tensor] = None,
        depth: Optional[Tensor] = None,
        gates: Optional[Tensor] = None,
        policy: Optional[RoutingPolicy] = None,
        return_report: bool = False,
        return_hidden: bool = False,
    ):
        """Encode a padded batch with per-sample / per-frame depth: the routing engine's
        :meth:`dynenc.engine.RoutedEncoder.forward` (arguments, shapes, returns), except under
        ``torch.jit.trace``, which traces the padded twin (full depth)."""
        if torch.jit.is_tracing():
            return self._traced_forward(
                input, lengths, layer_mask, depth, gates, policy, return_report or return_hidden
            )
        return super().forward(
            input,
            lengths,
            layer_mask=layer_mask,
            depth=depth,
            gates=gates,
            policy=policy,
            return_report=return_report,
            return_hidden=return_hidden,
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` scripts the padded twin (full depth, inference; shares these
        parameters): TorchScript cannot express data-dependent packing."""
        return PaddedConformer(self).train(self.training)

    def _traced_forward(self, input: Tensor, lengths: Tensor, *routing_and_report) -> Tuple[Tensor, Tensor]:
        """Under ``torch.jit.trace``: the padded twin, whose trace holds for other lengths and
        batch sizes (the packed path's sizes are data-dependent and would be frozen)."""
        if any(arg is not None and arg is not False for arg in routing_and_report):
            raise ValueError(
                "torch.jit.trace supports forward(input, lengths) at full depth only; for a fixed budget "
                "trace dynenc.padded.PaddedConformer(model, layers=...), for routing use torch.export"
            )
        return PaddedConformer(self).eval()(input, lengths)

    # ------------------------------------------------------------------ the family's parts
    def routed_layers(self) -> nn.ModuleList:
        return self.conformer_layers

    def weight_dtype(self) -> torch.dtype:
        if not self.num_layers:
            return torch.get_default_dtype()
        return cast(DynamicConformerLayer, self.conformer_layers[0]).final_layer_norm.weight.dtype

    def skipped_rows(self, layer: nn.Module, x: Tensor) -> Tensor:
        """``x``, or with ``skip_mode="final_norm"`` the layer's final LayerNorm of it."""
        if self.skip_mode != "final_norm":
            return x
        if is_fully_sharded(layer):
            raise ValueError(
                "skip_mode='final_norm' is not supported with a layer sharded by fully_shard: the "
                "skipped rows' LayerNorm would read the layer's sharded parameters outside its "
                "forward; use skip_mode='identity' or shard the whole model as one unit"
            )
        return cast(DynamicConformerLayer, layer).final_layer_norm(x)

    def padded(self, layers: Optional[Sequence[int]] = None, start: int = 0, stop: Optional[int] = None) -> nn.Module:
        return PaddedConformer(self, layers=layers, start=start, stop=stop)

    def layer_flops(self, tokens: int, sum_sq_lengths: float) -> float:
        """Estimated FLOPs of one layer on ``tokens`` rows whose sequences have squared
        lengths summing to ``sum_sq_lengths`` (matmuls 2*m*n*k; attention QK^T and PV)."""
        d, f, k = self.input_dim, self.ffn_dim, self.kernel_size
        per_token = 2 * (2 * 2 * d * f) + 2 * 4 * d * d + 2 * (2 * d * d + d * d) + 2 * k * d
        return tokens * per_token + 4.0 * d * sum_sq_lengths
