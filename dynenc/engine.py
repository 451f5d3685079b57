"""The routing engine every encoder family runs on: pack, schedule, per-layer routes, gather /
layer on packed rows / gated residual scatter, decision points, zero-row calls for DDP and
FSDP2, activation checkpointing and the executed-work report.

A family (:class:`~dynenc.model.DynamicConformer`, :class:`~dynenc.foundation.DynamicTransformer`)
subclasses :class:`RoutedEncoder` and supplies only its layers (each called as
``layer(rows [M, D], batch: VarlenBatch, **layer_inputs)``), what runs before the stack
(:meth:`RoutedEncoder.embed`) and after it on each row (:meth:`RoutedEncoder.finish_rows`),
what a skipped row becomes
(:meth:`RoutedEncoder.skipped_rows`) and its FLOP model (:meth:`RoutedEncoder.layer_flops`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, cast

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils.checkpoint import checkpoint

from . import ops, validation
from .routing import HostSizes, LayerRoute, PackedBatch, Schedule, VarlenBatch, pack, read_host_inputs, row_depth


@dataclass
class ExecutedWork:
    """What a forward actually computed.

    Attributes:
        tokens_per_layer: executed rows (token x layer pairs) per layer.
        total_tokens: valid frames in the batch (N).
        num_layers: L.
        sample_depth: int64 ``[B]`` layers that ran on at least one frame of each sample.
        frame_depth: int64 ``[B, T]`` layers each frame ran (0 at pads).
        flops: estimated multiply-adds x 2 of the executed layers (the family's FLOP model).
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
    layer (for methods that need per-layer details; before :meth:`RoutedEncoder.finish_rows`),
    and the routing policy's decisions: ``decisions[l]`` is what ``policy.decide`` returned
    after 0-based layer ``l`` (in packed order; ``packed`` maps it back to samples)."""

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


def is_fully_sharded(module: nn.Module) -> bool:
    """True when ``module`` was sharded by FSDP2's ``fully_shard`` (its forward hooks run
    collectives). Cheap: FSDP2 cannot be in use before its module was imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


@contextlib.contextmanager
def batch_norm_stats_frozen(module: nn.Module):
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


class RoutedEncoder(nn.Module):
    """A stack of ``num_layers`` layers of width ``input_dim`` on packed rows with ragged
    per-sample / per-frame depth (the base of every encoder family).

    A subclass sets ``input_dim``, ``num_layers`` and ``checkpoint_layers`` and implements
    :meth:`routed_layers` and :meth:`layer_flops`; it may override :meth:`embed`,
    :meth:`layer_inputs`, :meth:`skipped_rows`, :meth:`finish_rows` and
    :meth:`default_layer_mask`. :meth:`forward` validates its arguments
    (:func:`dynenc.validation.check_encoder_inputs`) and calls :meth:`route`.

    Distributed training: a layer that no row of the local batch runs is still called in
    training (and always when it is sharded with FSDP2's ``fully_shard``), on zero rows, so
    every rank issues the same collectives (FSDP2's all-gather and reduce-scatter, DDP's
    gradient buckets) whatever its masks; see :meth:`_run_layer`.
    """

    input_dim: int
    num_layers: int
    checkpoint_layers: bool

    # ------------------------------------------------------------------ what a family supplies
    def routed_layers(self) -> nn.ModuleList:
        """The L layers, in order."""
        raise NotImplementedError

    def layer_flops(self, tokens: int, sum_sq_lengths: float) -> float:
        """Estimated FLOPs of one layer on ``tokens`` rows whose sequences have squared
        lengths summing to ``sum_sq_lengths``."""
        raise NotImplementedError

    def embed(self, x: Tensor, frames: Tensor) -> Tensor:
        """What runs before the layer stack on the padded input ``x [B, T, D]`` (``frames``
        int64 ``[B]`` valid), e.g. a positional convolution; a model calls it on its front-end's
        output before :meth:`forward`. Nothing by default."""
        return x

    def layer_inputs(self, batch: VarlenBatch) -> Dict[str, Any]:
        """Keyword arguments every layer call of a forward on the full packed ``batch`` gets
        besides its rows and sub-batch (e.g. a position bias table shared by all layers)."""
        return {}

    def skipped_rows(self, layer: nn.Module, x: Tensor) -> Tensor:
        """What the rows ``x [N, D]`` that skip ``layer`` become (and what a gate
        interpolates from): themselves."""
        return x

    def finish_rows(self, x: Tensor, batch: VarlenBatch) -> Tensor:
        """What runs on every row after the last layer it ran (e.g. a pre-LN encoder's final
        LayerNorm); ``x [N, D]`` -> ``[N, D]``. Nothing by default."""
        return x

    def padded(self, layers: Optional[Sequence[int]] = None, start: int = 0, stop: Optional[int] = None) -> nn.Module:
        """The padded twin in standard ATen ops (exports without the ``dynenc::`` ops) running
        the 0-based ``layers`` (all by default) of layers ``start..stop - 1`` for every sample:
        ``(input [B, T, D], lengths [B]) -> (output, lengths)``; its ``finish(x, lengths)`` is
        what a head reads. Inference only."""
        raise NotImplementedError(f"{type(self).__name__} has no padded twin")

    def shardable_layers(self) -> List[nn.Module]:
        """The layers whose parameters only their own forward reads, which FSDP2 may shard as
        units of their own (``fully_shard(layer)``): all of them by default."""
        return list(self.routed_layers())

    def weight_dtype(self) -> torch.dtype:
        """The dtype the layers' parameters have (the input must match it, outside autocast)."""
        return next(self.routed_layers().parameters(), torch.empty(())).dtype

    def default_layer_mask(self, batch_size: int, device: torch.device) -> Optional[Tensor]:
        """The bool ``[B, L]`` mask of a forward that gives no routing of its own (e.g. a
        training-time layer drop), or None (every layer): None by default."""
        return None

    # ------------------------------------------------------------------ the engine
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
            input: ``[B, T, D]`` float (a foundation model's: the output of :meth:`embed`).
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
        frames = validation.check_encoder_inputs(
            input, lengths, self.input_dim, self.num_layers, self.weight_dtype(), layer_mask, depth, gates, policy
        )
        if all(routing is None for routing in (layer_mask, depth, gates, policy)):
            layer_mask = self.default_layer_mask(input.shape[0], input.device)
        return self.route(
            input,
            lengths,
            frames,
            layer_mask=layer_mask,
            depth=depth,
            gates=gates,
            policy=policy,
            return_report=return_report,
            return_hidden=return_hidden,
        )

    def route(
        self,
        input: Tensor,
        lengths: Tensor,
        frames: Tensor,
        *,
        layer_mask: Optional[Tensor] = None,
        depth: Optional[Tensor] = None,
        gates: Optional[Tensor] = None,
        policy: Optional[RoutingPolicy] = None,
        return_report: bool = False,
        return_hidden: bool = False,
    ):
        """Run the layers on the valid frames of ``input [B, T, D]`` (``frames`` int64 ``[B]``,
        validated) under the routing arguments (see :meth:`forward`).

        Returns ``(output [B, T, D], lengths)`` (pads zero) or an :class:`EncoderOutput`
        when ``return_report`` or ``return_hidden``."""
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
                output = packed.unpack(self.finish_rows(x, packed.batch))
                if output.requires_grad and not torch.compiler.is_compiling() and output._is_view():
                    # The output owns its storage: a wrapper that hooks it (FSDP2 registers its
                    # pre-backward hook there) would lose the hook to a caller's in-place op on a view.
                    output = output.clone()
        if not (return_report or return_hidden):
            return output, lengths
        return EncoderOutput(output, lengths, self.executed_work(packed, routes), routes, packed, hidden, decisions)

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
        the rows after each layer are appended to it. (:meth:`finish_rows` is not applied.)"""
        routes = schedule.routes(0)
        decision_layers = set(policy.decision_layers) if policy is not None else set()
        decisions: Dict[int, Any] = {}
        inputs = self.layer_inputs(schedule.batch)
        for layer_id, layer in enumerate(self.routed_layers()):
            with torch.profiler.record_function(f"dynenc.layer{layer_id}"):
                # routes(0), and each decision's routes(l + 1) after l, fill every layer's entry: no None.
                x = self._run_layer(layer, x, cast(LayerRoute, routes[layer_id]), inputs)
            if hidden is not None:
                hidden.append(x)
            if policy is not None and layer_id in decision_layers and layer_id + 1 < self.num_layers:
                schedule, decisions[layer_id] = policy.decide(layer_id, x, schedule)
                routes[layer_id + 1 :] = schedule.routes(layer_id + 1)[layer_id + 1 :]
        return x, routes, decisions

    def _run_layer(self, layer: nn.Module, x: Tensor, route: LayerRoute, inputs: Dict[str, Any]) -> Tensor:
        """Layer ``layer`` on the rows of ``route`` of ``x [N, D]``; every other row becomes
        :meth:`skipped_rows`. Returns ``[N, D]``."""
        runs_everything = route.index is None and guard_or_false(route.num_rows == x.shape[0])
        if runs_everything and route.gate is None:
            return self._call_layer(layer, x, route.batch, inputs)
        base = self.skipped_rows(layer, x)
        if guard_or_false(route.num_rows == 0):
            if not ((self.training and torch.is_grad_enabled()) or is_fully_sharded(layer)):
                return base
            # The layer on zero rows: costs its collectives and a few hundred zero-row op calls,
            # no FLOPs. Its hooks fire as on every other rank (FSDP2 all-gathers in the forward,
            # reduce-scatters in the backward), and its parameters join the graph with a zero
            # gradient (DDP needs no find_unused_parameters; optimizers see 0, not None). The
            # empty output joins the residual stream so its backward runs in layer order.
            with batch_norm_stats_frozen(layer):
                empty = layer(x[:0], route.batch, **inputs)
            return base + empty.sum()
        active = x[: route.num_rows] if route.index is None else ops.gather_rows(x, route.index)
        out = self._call_layer(layer, active, route.batch, inputs)
        return ops.gated_residual_scatter(base, out, route.gate, route.index)

    def _call_layer(self, layer: nn.Module, rows: Tensor, batch: VarlenBatch, inputs: Dict[str, Any]) -> Tensor:
        """``layer(rows [M, D], batch, **inputs)``, recomputed in the backward when ``checkpoint_layers``."""
        if not (self.checkpoint_layers and self.training and torch.is_grad_enabled()):
            return layer(rows, batch, **inputs)
        return checkpoint(
            layer,
            rows,
            batch,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), batch_norm_stats_frozen(layer)),
            **inputs,
        )

    # ------------------------------------------------------------------ accounting
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
