"""``ops``: each native op against the eager torch compositions it replaces, on the packed
rows of the benchmark batch at ``op_dim`` channels and one per-sample LD layer route (a
random half of the samples); plus the routing step and one Conformer layer on those rows
for the routing overhead. :data:`OP_BENCHMARKS` is keyed by the op table's names
(:data:`dynenc.ops.OPS`); every forward op but ``scatter_rows`` (the inverse of ``gather_rows``,
the same traffic) has a row."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dynenc import ops as native_ops
from dynenc.layer import DynamicConformerLayer

from ..harness import Prepared
from ..workload import BenchConfig, Workload, padding_mask
from .base import Builder, Case, Figure, Ratio, under_inference


def _op(make: Callable[[Workload], Callable[[], Any]]) -> Builder:
    """A micro-benchmark: ``make(workload)`` returns the call, repeated inside a measurement."""
    return lambda w: Prepared(under_inference(make(w)), repeat_inside=True)


def _dwconv_inputs(w: Workload):
    """Packed rows, depthwise weight ``[C, K]`` and bias ``[C]`` at ``op_dim`` channels."""
    rows = w.op_rows["packed"]
    channels = w.config.op_dim
    generator = torch.Generator().manual_seed(w.config.seed + 4)
    weight = torch.randn(channels, w.config.model.kernel_size, generator=generator).to(w.device)
    bias = torch.randn(channels, generator=generator).to(w.device)
    return rows, weight, bias


def _dwconv_padded(input: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """torchaudio's depthwise conv: over the padded ``[B, C, T]`` batch."""
    return F.conv1d(input, weight.unsqueeze(1), bias, padding=(weight.shape[1] - 1) // 2, groups=weight.shape[0])


def _dwconv_per_sequence(x: Tensor, bounds: Sequence[int], weight: Tensor, bias: Tensor) -> Tensor:
    """Packed rows ``[N, C]``, one ``F.conv1d`` per sequence (host-side bounds given)."""
    return torch.cat([_dwconv_padded(x[start:end].t().unsqueeze(0), weight, bias)[0].t()
                      for start, end in zip(bounds[:-1], bounds[1:])])


def _attention_inputs(w: Workload):
    """q, k, v ``[N, H, Dh]`` packed and ``[B, H, T, Dh]`` padded, with the key mask."""
    packed, padded = w.op_rows["packed"], w.op_rows["padded"]
    heads = w.config.model.num_heads
    q, k, v = (packed.x.view(packed.x.shape[0], heads, -1).roll(shift, 2).contiguous() for shift in (0, 1, 2))
    dense = [packed.unpack(t).transpose(1, 2).contiguous() for t in (q, k, v)]
    keep = ~padding_mask(w.input[1], padded.shape[1])
    return packed, (q, k, v), dense, keep[:, None, None, :]


def _layer(w: Workload) -> Callable[[], Any]:
    """One D = op_dim Conformer layer on the active rows of the route."""
    config = w.config
    torch.manual_seed(config.seed)
    layer = DynamicConformerLayer(config.op_dim, config.op_ffn_dim, config.model.num_heads,
                                  config.model.kernel_size).to(w.device).eval()
    rows, route = w.op_rows["packed"], w.op_rows["route"]
    active = rows.x.index_select(0, route.index)
    return lambda: layer(active, route.batch)


def _gated_scatter(native: bool) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        x, route = w.op_rows["packed"].x, w.op_rows["route"]
        y = torch.randn(route.num_rows, x.shape[1], generator=torch.Generator().manual_seed(5)).to(w.device)
        gate = torch.rand(route.num_rows, generator=torch.Generator().manual_seed(6)).to(w.device)
        impl = native_ops.gated_residual_scatter if native else native_ops.reference("gated_residual_scatter")
        return lambda: impl(x, y, gate, route.index)

    return _op(make)


def _gather(native: bool) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        x, index = w.op_rows["packed"].x, w.op_rows["route"].index
        # the reference is x.index_select(0, index)
        impl = native_ops.gather_rows if native else native_ops.reference("gather_rows")
        return lambda: impl(x, index)

    return _op(make)


def _dwconv(kind: str) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        packed, weight, bias = _dwconv_inputs(w)
        if kind == "native":
            return lambda: native_ops.varlen_dwconv1d(packed.x, packed.batch.cu_seqlens, weight, bias)
        if kind == "per-sequence":
            bounds = packed.batch.cu_seqlens.tolist()
            return lambda: _dwconv_per_sequence(packed.x, bounds, weight, bias)
        padded = w.op_rows["padded"].transpose(1, 2).contiguous()
        return lambda: _dwconv_padded(padded, weight, bias)

    return _op(make)


def _attention(kind: str) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        packed, (q, k, v), dense, keep = _attention_inputs(w)
        batch = packed.batch
        if kind == "native":
            return lambda: native_ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)
        if kind == "padded":
            return lambda: F.scaled_dot_product_attention(*dense, attn_mask=keep)
        bounds = batch.cu_seqlens.tolist()
        return lambda: torch.cat([
            F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])])

    return _op(make)


def _plan(kind: str) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        rows = w.op_rows
        cu_seqlens = rows["packed"].batch.cu_seqlens
        if kind == "routes":  # the whole routing step of a forward: plan + per-layer sub-batches
            return rows["schedule"].routes
        impl = native_ops.build_plan if kind == "native" else native_ops.reference("build_plan")
        return lambda: impl(rows["row_mask"], cu_seqlens)

    return _op(make)


def _add_layer_norm(native: bool) -> Builder:
    def make(w: Workload) -> Callable[[], Any]:
        x = w.op_rows["packed"].x
        generator = torch.Generator().manual_seed(w.config.seed + 7)
        residual, weight, bias = (torch.randn(shape, generator=generator).to(w.device)
                                  for shape in (x.shape, x.shape[1:], x.shape[1:]))
        # the reference is x + 0.5 * residual, then F.layer_norm of the sum
        impl = native_ops.add_layer_norm if native else native_ops.reference("add_layer_norm")
        return lambda: impl(x, residual, 0.5, weight, bias, 1e-5)

    return _op(make)


#: op name (dynenc.ops.OPS) -> (label, ((implementation, builder), ...)); the first implementation
#: is the native op, the others the eager torch compositions it replaces.
OP_BENCHMARKS: Dict[str, Tuple[str, Tuple[Tuple[str, Builder], ...]]] = {
    "gated_residual_scatter": ("gated scatter", (("native", _gated_scatter(True)),
                                                 ("eager clone+index_select+index_copy", _gated_scatter(False)))),
    "gather_rows": ("gather", (("native", _gather(True)), ("eager index_select", _gather(False)))),
    "varlen_dwconv1d": ("dwconv", (("native", _dwconv("native")), ("eager per-sequence conv1d", _dwconv("per-sequence")),
                                   ("eager padded conv1d", _dwconv("padded")))),
    "varlen_attention": ("attention", (("native", _attention("native")), ("eager padded SDPA", _attention("padded")),
                                       ("eager per-sequence SDPA", _attention("per-sequence")))),
    "build_plan": ("plan", (("native", _plan("native")), ("eager reference", _plan("reference")))),
    "add_layer_norm": ("add + layer norm", (("native", _add_layer_norm(True)),
                                            ("eager add + layer_norm", _add_layer_norm(False)))),
}
assert set(OP_BENCHMARKS) <= set(native_ops.OPS), "OP_BENCHMARKS must use the op table's names"
OPS = dict(OP_BENCHMARKS.values())  # label -> implementations
ROUTES, LAYER = "routes (plan + sub-batches, all layers)", "layer"


def cases(config: BenchConfig) -> List[Case]:
    result = [Case("ops", f"{op} {impl}", "dynenc" if impl == "native" else "eager", build)
              for op, impls in OPS.items() for impl, build in impls]
    return result + [Case("ops", ROUTES, "dynenc", _plan("routes")), Case("ops", LAYER, "dynenc", _op(_layer))]


def ratios(config: BenchConfig) -> List[Ratio]:
    result = [Ratio("ops", f"{op}: native / {impl}", f"ops/{op} native", f"ops/{op} {impl}")
              for op, impls in OPS.items() for impl, _ in impls[1:]]
    overhead = ((f"ops/{ROUTES}", 1.0 / config.model.num_layers), ("ops/gather native", 1.0),
                ("ops/gated scatter native", 1.0))
    result.append(Ratio("ops", f"routing overhead / layer (D={config.op_dim})", overhead, f"ops/{LAYER}",
                        target=0.03, note="(routes / L + gather + gated scatter) of one layer over the layer itself"))
    return result


FIGURE = Figure("ops", cases, ratios, per_token=False)
