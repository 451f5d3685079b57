"""Packing and routing plans: which packed rows run which layer.

A batch enters as ``[B, T, D]`` + lengths and is packed into ``[N, D]`` rows
(FlashAttention-varlen style, no padded frame exists inside). A :class:`Schedule` states
which (sample, layer) and (frame, layer) pairs execute; :meth:`Schedule.routes` turns it
into one :class:`LayerRoute` per layer — the active rows (an index vector, or a prefix when
samples were sorted by depth) plus the ``cu_seqlens`` of the compact active sub-batch.
Routes are computed on the device with one host sync per decision point (to learn the
sizes of the active sets), none when their :class:`HostSizes` are known from the forward's
one read of its inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import ops


def valid_frames(lengths: Tensor, num_frames: int) -> Tensor:
    """bool ``[B, T]``: True at the first ``lengths[b]`` frames of each sample (False at pads)."""
    return torch.arange(num_frames, device=lengths.device)[None, :] < lengths[:, None]


@dataclass
class VarlenBatch:
    """A packed (sub-)batch: rows ``[num_rows, D]`` split by ``cu_seqlens`` (int32 ``[B + 1]``).

    ``max_seqlen`` is a host-side upper bound of the longest sequence, and of every row's
    :attr:`positions` entry.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    num_rows: int
    _seq_ids: Optional[Tensor] = field(default=None, repr=False)
    _positions: Optional[Tensor] = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def padded_positions(self, order: Optional[Tensor] = None) -> Tensor:
        """int64 ``[num_rows]``: each row's flat position ``b * max_seqlen + t`` in a padded
        ``[B, max_seqlen]`` view, ``b`` its sequence (or ``order[sequence]`` when given)."""
        seq = self.seq_ids
        sample = seq if order is None else order.index_select(0, seq)
        return sample * self.max_seqlen + self._offsets_in_seq()

    def _offsets_in_seq(self) -> Tensor:
        """int64 ``[num_rows]``: each row's offset in its packed sequence."""
        seq = self.seq_ids
        return torch.arange(self.num_rows, device=seq.device) - self.cu_seqlens.long().index_select(0, seq)

    @classmethod
    def with_seq_ids(
        cls, cu_seqlens: Tensor, max_seqlen: int, num_rows: int, seq_ids: Tensor, positions: Optional[Tensor] = None
    ) -> VarlenBatch:
        """A batch whose rows' sequence ids (int64 ``[num_rows]``) its builder already holds, e.g.
        a route's rows gathered from the full batch's ids: they are not computed again. So may
        its rows' :attr:`positions` be (rows gathered after frames were dropped)."""
        batch = cls(cu_seqlens, max_seqlen, num_rows)
        batch._seq_ids = seq_ids
        batch._positions = positions
        return batch

    @property
    def positions(self) -> Tensor:
        """int64 ``[num_rows]``: each row's frame index in its original sequence, in
        ``[0, max_seqlen)``. Its offset in its packed sequence, unless the batch was built from
        rows of a larger one with frames left out (a route after frame skipping), whose rows
        keep the positions they had there (relative position biases read them)."""
        if self._positions is None:
            self._positions = self._offsets_in_seq()
        return self._positions

    @property
    def seq_ids(self) -> Tensor:
        """int64 ``[num_rows]``: the sequence each row belongs to (computed once)."""
        if self._seq_ids is None:
            self._seq_ids = ops.rows.sequence_ids(self.cu_seqlens, self.num_rows)
        return self._seq_ids


@dataclass
class PackedBatch:
    """``[B, T, D]`` + lengths packed to rows; packed sequence p is original sample ``order[p]``."""

    x: Tensor  # [N, D]
    batch: VarlenBatch
    order: Optional[Tensor]  # [B] int64, None = identity
    positions: Optional[Tensor]  # [N] int64 flat positions b * T + t, None = dense (no padding, identity order)
    batch_size: int
    max_frames: int

    def unpack(self, rows: Tensor) -> Tensor:
        """``[N, *F]`` packed rows -> ``[B, T, *F]`` in the original sample order, pads zero."""
        flat = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))
        if self.positions is not None:
            flat = ops.scatter_rows(flat, self.positions, self.batch_size * self.max_frames)
        return flat.reshape(self.batch_size, self.max_frames, *rows.shape[1:])

    def to_packed_order(self, per_sample: Tensor) -> Tensor:
        """Reorder a ``[B, ...]`` tensor given in original sample order to packed order."""
        return per_sample if self.order is None else per_sample.index_select(0, self.order)

    def to_sample_order(self, per_sample: Tensor) -> Tensor:
        """Inverse of :meth:`to_packed_order`."""
        if self.order is None:
            return per_sample
        return torch.empty_like(per_sample).index_copy_(0, self.order, per_sample)


def pack(input: Tensor, lengths: Tensor, order: Optional[Tensor] = None, num_rows: Optional[int] = None) -> PackedBatch:
    """Pack the valid frames of ``input [B, T, D]`` (``lengths`` int ``[B]``) into ``[N, D]``.

    ``order`` (a permutation of the samples) sets the packed sequence order. One host sync
    (for N) unless ``num_rows`` gives N (``lengths.sum()``). Lengths must already be
    validated; T is the ``max_seqlen`` bound.
    """
    batch_size, max_frames, _ = input.shape
    lengths = lengths.to(torch.int64)
    packed_lengths = lengths if order is None else lengths.index_select(0, order)
    if num_rows is None:
        num_rows = cast(int, lengths.sum().item())  # an int64 sum: int (a SymInt under torch.compile)
    torch._check(num_rows >= 0)
    cu_seqlens = F.pad(packed_lengths.cumsum(0), (1, 0)).to(torch.int32)
    batch = VarlenBatch(cu_seqlens, max_frames, num_rows)
    # guard_or_false: under torch.compile N is data-dependent; the general path is always correct.
    if order is None and guard_or_false(num_rows == batch_size * max_frames):
        return PackedBatch(input.reshape(num_rows, -1), batch, None, None, batch_size, max_frames)
    positions = batch.padded_positions(order)
    x = ops.gather_rows(input.reshape(batch_size * max_frames, -1), positions)
    return PackedBatch(x, batch, order, positions, batch_size, max_frames)


@dataclass
class LayerRoute:
    """The rows that run one layer: ``index`` (int64 ``[M]``) or the prefix ``0..M-1`` when
    ``index`` is None; ``batch`` is the compact active sub-batch; ``gate`` ``[M]`` or None (= 1)."""

    index: Optional[Tensor]
    batch: VarlenBatch
    gate: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows


class HostInputs(NamedTuple):
    """Host copies of ``DynamicConformer.forward``'s integer inputs, read in its one sync: valid
    frames per sample, depth per sample (or None) and layer_mask rows as 0/1 (or None)."""

    lengths: List[int]
    depth: Optional[List[int]]
    layer_mask: Optional[List[List[int]]]


def read_host_inputs(frames: Tensor, depth: Optional[Tensor] = None, layer_mask: Optional[Tensor] = None) -> HostInputs:
    """The forward's one host sync: ``frames`` int64 ``[B]``, ``depth`` ``[B]`` and ``layer_mask``
    ``[B, L]`` read together; they size the packing and the routes (:meth:`HostSizes.from_inputs`)."""
    batch_size = frames.shape[0]
    parts = [frames] + [t.to(torch.int64).reshape(-1) for t in (depth, layer_mask) if t is not None]
    values = (torch.cat(parts) if len(parts) > 1 else frames).tolist()
    rest = values[batch_size:]
    rows = None
    if layer_mask is not None:
        num_layers = layer_mask.shape[1]
        rows = [rest[b * num_layers : (b + 1) * num_layers] for b in range(batch_size)]
    return HostInputs(values[:batch_size], rest if depth is not None else None, rows)


@dataclass(frozen=True)
class HostSizes:
    """The sizes of a forward's packing and routing plan, computed on the host from its
    inputs (read in the forward's one sync), so that :func:`pack` and :meth:`Schedule.routes`
    need no sync of their own. Per layer l:

    * ``layer_seqs[l]``: sequences in the route's sub-batch: with ``depth``, the prefix of
      samples with ``depth > l`` (packed in non-increasing depth order); otherwise B;
    * ``layer_rows[l]``: rows that run layer l: ``sum(lengths[b])`` over the samples with
      ``depth[b] > l`` (the prefix's ``cu_seqlens[layer_seqs[l]]``) or with
      ``layer_mask[b][l]`` (the ``build_plan`` offsets are their cumulative sum); N at full depth.
    """

    num_rows: int
    layer_seqs: Tuple[int, ...]
    layer_rows: Tuple[int, ...]

    @classmethod
    def from_inputs(
        cls,
        lengths: Sequence[int],
        num_layers: int,
        depth: Optional[Sequence[int]] = None,
        layer_mask: Optional[Sequence[Sequence[int]]] = None,
    ) -> HostSizes:
        """From the valid frames per sample and at most one of ``depth`` (per sample) and
        ``layer_mask`` (``[B][L]``, truthy = runs), all host values in original sample order."""
        num_rows, num_seqs = sum(lengths), len(lengths)
        if depth is not None:
            seqs = [sum(d > layer for d in depth) for layer in range(num_layers)]
            rows = [sum(n for n, d in zip(lengths, depth) if d > layer) for layer in range(num_layers)]
        elif layer_mask is not None:
            seqs = [num_seqs] * num_layers
            rows = [sum(n for n, m in zip(lengths, layer_mask) if m[layer]) for layer in range(num_layers)]
        else:
            seqs, rows = [num_seqs] * num_layers, [num_rows] * num_layers
        return cls(num_rows, tuple(seqs), tuple(rows))


@dataclass
class Schedule:
    """What executes, in packed order.

    Attributes:
        batch: the full packed batch.
        num_layers: L.
        depth: int64 ``[B]`` per-sample depth, samples sorted by non-increasing depth
            (then each layer's active set is a row prefix), or None.
        sample_mask: bool ``[B, L]`` per-(sample, layer) execution mask, or None.
        row_alive: bool ``[N]`` frames still in the sequence (frame skipping), or None.
        gates: ``[B, L]`` per-(sample, layer) gate values, or None (= 1).
        sizes: the routes' sizes when known on the host (then :meth:`routes` makes no host
            sync), or None. They must describe ``depth`` / ``sample_mask`` and no ``row_alive``.
    """

    batch: VarlenBatch
    num_layers: int
    depth: Optional[Tensor] = None
    sample_mask: Optional[Tensor] = None
    row_alive: Optional[Tensor] = None
    gates: Optional[Tensor] = None
    sizes: Optional[HostSizes] = None

    def replace(self, **changes) -> Schedule:
        """A copy with ``changes``; ``sizes`` is dropped (unless given) when what runs changes."""
        if changes.keys() - {"gates", "sizes"}:
            changes.setdefault("sizes", None)
        return dataclasses.replace(self, **changes)

    def routes(self, start: int = 0) -> List[Optional[LayerRoute]]:
        """One route per layer ``start..L-1`` (entries before ``start`` are None)."""
        with torch.profiler.record_function("dynenc.plan"):
            if self.sample_mask is None and self.row_alive is None:
                routes = self._prefix_routes(start)
            else:
                routes = self._indexed_routes(start)
        return [None] * start + routes

    def _gate(self, layer: int, seq_ids: Tensor) -> Optional[Tensor]:
        return None if self.gates is None else self.gates[:, layer].index_select(0, seq_ids)

    def _prefix_routes(self, start: int) -> List[LayerRoute]:
        full = self.batch
        layers = range(start, self.num_layers)
        if self.depth is None:
            counts = [(full.num_seqs, full.num_rows)] * len(layers)
        elif self.sizes is not None:
            counts = list(zip(self.sizes.layer_seqs[start:], self.sizes.layer_rows[start:]))
        else:
            thresholds = torch.arange(start, self.num_layers, device=self.depth.device)
            active_seqs = (self.depth.unsqueeze(0) > thresholds.unsqueeze(1)).sum(1)
            rows = full.cu_seqlens.long().index_select(0, active_seqs)
            counts = torch.stack([active_seqs, rows], 1).tolist()  # one host sync for every layer
        routes = []
        for layer, (num_seqs, num_rows) in zip(layers, counts):
            seq_ids = full.seq_ids[:num_rows]
            sub = VarlenBatch.with_seq_ids(full.cu_seqlens[: num_seqs + 1], full.max_seqlen, num_rows, seq_ids)
            routes.append(LayerRoute(None, sub, self._gate(layer, seq_ids)))
        return routes

    def _indexed_routes(self, start: int) -> List[LayerRoute]:
        full = self.batch
        num_layers = self.num_layers - start
        if self.sample_mask is not None:
            row_mask = self.sample_mask[:, start:].index_select(0, full.seq_ids).t()
        else:
            row_mask = torch.ones(num_layers, full.num_rows, dtype=torch.bool, device=full.cu_seqlens.device)
        if self.row_alive is not None:
            row_mask = row_mask & self.row_alive.unsqueeze(0)
        indices, offsets, active_cu = ops.build_plan(row_mask.contiguous(), full.cu_seqlens)
        if self.sizes is not None and self.row_alive is None:
            bounds = [0, *itertools.accumulate(self.sizes.layer_rows[start:])]
        else:
            bounds = offsets.tolist()
        all_seq_ids = full.seq_ids.index_select(0, indices)  # once for every layer: one launch, not L
        # Whole sequences keep their offsets as positions; with frames dropped the rows keep theirs.
        all_positions = None if self.row_alive is None else full.positions.index_select(0, indices)
        routes = []
        for i in range(num_layers):
            index = indices[bounds[i] : bounds[i + 1]]
            seq_ids = all_seq_ids[bounds[i] : bounds[i + 1]]
            positions = None if all_positions is None else all_positions[bounds[i] : bounds[i + 1]]
            sub = VarlenBatch.with_seq_ids(active_cu[i], full.max_seqlen, bounds[i + 1] - bounds[i], seq_ids, positions)
            routes.append(LayerRoute(index, sub, self._gate(start + i, seq_ids)))
        return routes


def row_depth(routes: Sequence[Optional[LayerRoute]], num_rows: int, device: torch.device) -> Tensor:
    """int64 ``[N]``: how many layers each packed row executed."""
    depth = torch.zeros(num_rows, dtype=torch.int64, device=device)
    for route in routes:
        if route is None or guard_or_false(route.num_rows == 0):
            continue
        if route.index is None:
            depth[: route.num_rows] += 1
        else:
            depth.index_add_(0, route.index, torch.ones_like(route.index))
    return depth
