"""``DynamicConformer``: torchaudio's Conformer on packed rows with ragged per-sample and
per-frame depth.

Submodule and parameter names are those of ``torchaudio.models.Conformer`` so its state
dict loads with ``strict=True`` (the layer: :mod:`dynenc.layer`). Inside, every layer runs on
the packed ``[N, D]`` rows of the samples/frames its route selects; skipped (sample, layer)
pairs, padded frames and dropped frames are never computed.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple, cast

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils.checkpoint import checkpoint

from . import ops, validation
from .layer import DynamicConformerLayer
from .padded import PaddedConformer
from .routing import HostSizes, LayerRoute, PackedBatch, Schedule, VarlenBatch, pack, read_host_inputs, row_depth

SKIP_MODES = ("identity", "final_norm")


@dataclass
class ExecutedWork:
    """What a forward actually computed.

    Attributes:
        tokens_per_layer: executed rows (token x layer pairs) per layer.
        total_tokens: valid frames in the batch (N).
        num_layers: L.
        sample_depth: int64 ``[B]`` layers that ran on at least one frame of each sample.
        frame_depth: int64 ``[B, T]`` layers each frame ran (0 at pads).
        flops: estimated multiply-adds x 2 of the executed layers (matmuls, attention, conv).
    """

    tokens_per_layer: List[int]
    total_tokens: int
    num_layers: int
    sample_depth: Tensor
    frame_depth: Tensor
    flops: float

    @property
    def executed_token_layers(self) -> int:
        return sum(self.tokens_per_layer)

    @property
    def executed_fraction(self) -> float:
        """Executed token x layers over full-depth token x layers."""
        return self.executed_token_layers / max(self.total_tokens * self.num_layers, 1)


@dataclass
class EncoderOutput:
    """``output [B, T, D]`` (pads zero), ``lengths [B]``, the executed-work report, the route
    every layer executed, the packing, (when asked) the packed rows ``[N, D]`` after each
    layer (for methods that need per-layer details), and the routing policy's decisions:
    ``decisions[l]`` is what ``policy.decide`` returned after 0-based layer ``l`` (in packed
    order; ``packed`` maps it back to samples)."""

    output: Tensor
    lengths: Tensor
    report: ExecutedWork
    routes: List[Optional[LayerRoute]]
    packed: PackedBatch
    hidden: Optional[List[Tensor]] = None
    decisions: Dict[int, Any] = field(default_factory=dict)


class RoutingPolicy(Protocol):
    """A decision point inside the forward, without state of its own: after each 0-based
    layer in ``decision_layers``, ``decide(layer, x [N, D] rows, schedule)`` returns the
    schedule for the layers after it (e.g. with frames or samples removed) and its decision,
    which the forward hands back in :attr:`EncoderOutput.decisions`."""

    decision_layers: Tuple[int, ...]

    def decide(self, layer: int, x: Tensor, schedule: Schedule) -> Tuple[Schedule, Any]: ...


def _structure(layer: nn.Module) -> List[Tuple[str, str]]:
    """``(name, "Type(settings)")`` of every submodule of a layer, and its ``convolution_first``."""
    found = [(name, f"{type(module).__name__}({module.extra_repr()})") for name, module in layer.named_modules()]
    found[0] = ("", f"convolution_first={getattr(layer, 'convolution_first', None)}")
    return found


def _is_fully_sharded(module: nn.Module) -> bool:
    """True when ``module`` was sharded by FSDP2's ``fully_shard`` (its forward hooks run
    collectives). Cheap: FSDP2 cannot be in use before its module was imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


@contextlib.contextmanager
def _batch_norm_stats_frozen(module: nn.Module):
    """Training-mode BatchNorm in ``module`` normalises with batch statistics but leaves its
    running statistics and batch counter as they were: for a recomputed forward (activation
    checkpointing) and for a layer called on zero rows, which must not count as a batch.
    (Momentum 0 rather than ``track_running_stats=False``: the recomputation must save the
    same tensors as the forward.)"""
    norms = [
        (m, m.momentum, m.num_batches_tracked, m.num_batches_tracked.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.num_batches_tracked is not None
    ]
    for norm, _, _, _ in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum, tracked, counter in norms:
            norm.momentum = momentum
            tracked.copy_(counter)


class DynamicConformer(nn.Module):
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

    Distributed training: a layer that no row of the local batch runs is still called in
    training (and always when it is sharded with FSDP2's ``fully_shard``), on zero rows, so
    every rank issues the same collectives (FSDP2's all-gather and reduce-scatter, DDP's
    gradient buckets) whatever its masks; see :meth:`_run_layer`.
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

    def _weight_dtype(self) -> torch.dtype:
        if not self.num_layers:
            return torch.get_default_dtype()
        return cast(DynamicConformerLayer, self.conformer_layers[0]).final_layer_norm.weight.dtype

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
        """Encode a padded batch with per-sample / per-frame depth.

        Args:
            input: ``[B, T, D]`` float.
            lengths: ``[B]`` valid frames per sample in ``[0, T]``, integer or floating (as in
                torchaudio, frame t is valid iff ``t < lengths[b]``); a zero-length sample gives
                zero output rows and leaves the others untouched.
            layer_mask: bool ``[B, L]``: sample b runs layer l iff ``layer_mask[b, l]``.
            depth: int ``[B]``: sample b runs layers ``0..depth[b]-1`` (samples are sorted by
                depth inside so every layer's active set is a prefix: no gather at all).
            gates: float ``[B, L]``: gate of each executed (sample, layer);
                ``x <- x + g * (F(x) - x)`` (soft or straight-through gates in training).
            policy: decision points inside the forward (frame skipping, early exit).
            return_report: return an :class:`EncoderOutput` with the executed-work report.
            return_hidden: also keep the packed rows after every layer (implies return_report).
        Returns:
            ``(output [B, T, D], lengths [B])`` like torchaudio (pad positions zero), or an
            :class:`EncoderOutput` when ``return_report``.
        """
        if torch.jit.is_tracing():
            return self._traced_forward(
                input, lengths, layer_mask, depth, gates, policy, return_report or return_hidden
            )
        frames = validation.check_encoder_inputs(
            input, lengths, self.input_dim, self.num_layers, self._weight_dtype(), layer_mask, depth, gates, policy
        )
        sizes = None  # while compiling: the plan reads its sizes as data-dependent ints
        if not torch.compiler.is_compiling():
            # The forward's one host sync (a policy's decisions add their own): lengths, depth
            # and layer_mask, which size the packing and the routes, checked on the host copies.
            host = read_host_inputs(frames, depth, layer_mask)
            validation.check_host_ranges(host.lengths, host.depth, input.shape[1], self.num_layers)
            sizes = HostSizes.from_inputs(host.lengths, self.num_layers, host.depth, host.layer_mask)
        # Every index and cu_seqlens below is built here, right by construction: the CUDA ops
        # skip their value checks (a host sync each). Not entered while compiling: a compiled
        # graph calls the ops from outside this frame, and there the checks run.
        trust = contextlib.nullcontext() if torch.compiler.is_compiling() else validation.trusted_inputs()
        with trust:
            with torch.profiler.record_function("dynenc.pack"):
                order = None if depth is None else torch.sort(depth, descending=True, stable=True).indices
                packed = pack(input, frames, order, None if sizes is None else sizes.num_rows)
            schedule = Schedule(
                packed.batch,
                self.num_layers,
                depth=None if depth is None else packed.to_packed_order(depth.to(torch.int64)),
                sample_mask=None if layer_mask is None else packed.to_packed_order(layer_mask),
                gates=None if gates is None else packed.to_packed_order(gates),
                sizes=sizes,
            )
            hidden: Optional[List[Tensor]] = [] if return_hidden else None
            x, routes, decisions = self.forward_packed(packed.x, schedule, policy, hidden)
            with torch.profiler.record_function("dynenc.unpack"):
                output = packed.unpack(x)
                if output.requires_grad and not torch.compiler.is_compiling() and output._is_view():
                    # The output owns its storage: a wrapper that hooks it (FSDP2 registers its
                    # pre-backward hook there) would lose the hook to a caller's in-place op on a view.
                    output = output.clone()
        if not (return_report or return_hidden):
            return output, lengths
        return EncoderOutput(output, lengths, self.executed_work(packed, routes), routes, packed, hidden, decisions)

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

    def forward_packed(
        self,
        x: Tensor,
        schedule: Schedule,
        policy: Optional[RoutingPolicy] = None,
        hidden: Optional[List[Tensor]] = None,
    ):
        """Run the layers on packed rows ``x [N, D]`` under ``schedule``; returns
        ``(x [N, D], routes, decisions)`` where ``routes[l]`` is the route layer l executed
        and ``decisions[l]`` the policy's decision after layer l. When ``hidden`` is a list,
        the rows after each layer are appended to it."""
        routes = schedule.routes(0)
        decision_layers = set(policy.decision_layers) if policy is not None else set()
        decisions: Dict[int, Any] = {}
        for layer_id, layer in enumerate(self.conformer_layers):
            with torch.profiler.record_function(f"dynenc.layer{layer_id}"):
                # routes(0), and each decision's routes(l + 1) after l, fill every layer's entry: no None.
                x = self._run_layer(cast(DynamicConformerLayer, layer), x, cast(LayerRoute, routes[layer_id]))
            if hidden is not None:
                hidden.append(x)
            if policy is not None and layer_id in decision_layers and layer_id + 1 < self.num_layers:
                schedule, decisions[layer_id] = policy.decide(layer_id, x, schedule)
                routes[layer_id + 1 :] = schedule.routes(layer_id + 1)[layer_id + 1 :]
        return x, routes, decisions

    def _run_layer(self, layer: DynamicConformerLayer, x: Tensor, route: LayerRoute) -> Tensor:
        """Layer ``layer`` on the rows of ``route`` of ``x [N, D]``; every other row passes
        through (``skip_mode``). Returns ``[N, D]``."""
        runs_everything = route.index is None and guard_or_false(route.num_rows == x.shape[0])
        if runs_everything and route.gate is None:
            return self._call_layer(layer, x, route.batch)
        # What a skipped row becomes, and what a gate interpolates from (see skip_mode).
        if self.skip_mode == "final_norm":
            if _is_fully_sharded(layer):
                raise ValueError(
                    "skip_mode='final_norm' is not supported with a layer sharded by fully_shard: the "
                    "skipped rows' LayerNorm would read the layer's sharded parameters outside its "
                    "forward; use skip_mode='identity' or shard the whole model as one unit"
                )
            base = layer.final_layer_norm(x)
        else:
            base = x
        if guard_or_false(route.num_rows == 0):
            if not ((self.training and torch.is_grad_enabled()) or _is_fully_sharded(layer)):
                return base
            # The layer on zero rows: costs its collectives and ~300 zero-row op calls, no
            # FLOPs. Its hooks fire as on every other rank (FSDP2 all-gathers in the forward,
            # reduce-scatters in the backward), and its parameters join the graph with a zero
            # gradient (DDP needs no find_unused_parameters; optimizers see 0, not None). The
            # empty output joins the residual stream so its backward runs in layer order.
            with _batch_norm_stats_frozen(layer):
                empty = layer(x[:0], route.batch)
            return base + empty.sum()
        active = x[: route.num_rows] if route.index is None else ops.gather_rows(x, route.index)
        return ops.gated_residual_scatter(base, self._call_layer(layer, active, route.batch), route.gate, route.index)

    def _call_layer(self, layer: DynamicConformerLayer, rows: Tensor, batch: VarlenBatch) -> Tensor:
        """``layer(rows [M, D], batch)``, recomputed in the backward when ``checkpoint_layers``."""
        if not (self.checkpoint_layers and self.training and torch.is_grad_enabled()):
            return layer(rows, batch)
        return checkpoint(
            layer,
            rows,
            batch,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _batch_norm_stats_frozen(layer)),
        )

    # ------------------------------------------------------------------ accounting
    def layer_flops(self, tokens: int, sum_sq_lengths: float) -> float:
        """Estimated FLOPs of one layer on ``tokens`` rows whose sequences have squared
        lengths summing to ``sum_sq_lengths`` (matmuls 2*m*n*k; attention QK^T and PV)."""
        d, f, k = self.input_dim, self.ffn_dim, self.kernel_size
        per_token = 2 * (2 * 2 * d * f) + 2 * 4 * d * d + 2 * (2 * d * d + d * d) + 2 * k * d
        return tokens * per_token + 4.0 * d * sum_sq_lengths

    def executed_work(self, packed: PackedBatch, routes: List[Optional[LayerRoute]]) -> ExecutedWork:
        """The executed-work report of a forward (one host sync)."""
        device = packed.x.device
        depth_rows = row_depth(routes, packed.batch.num_rows, device)
        frame_depth = packed.unpack(depth_rows.unsqueeze(1).double()).squeeze(2).long()
        sum_sq = torch.stack(
            [(r.batch.lengths.double() ** 2).sum() for r in routes if r is not None and r.num_rows > 0]
            or [torch.zeros((), dtype=torch.float64, device=device)]
        )
        tokens = [0 if r is None else r.num_rows for r in routes]
        flops = sum(self.layer_flops(t, s) for t, s in zip([t for t in tokens if t > 0], sum_sq.tolist()))
        return ExecutedWork(tokens, packed.batch.num_rows, self.num_layers, frame_depth.amax(1), frame_depth, flops)
