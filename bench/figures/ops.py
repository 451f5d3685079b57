"""``ops``: each native op against the eager torch compositions it replaces, on the packed
rows of the benchmark batch at ``op_dim`` channels and one per-sample LD layer route (a
random half of the samples); plus the routing step and one Conformer layer on those rows
for the routing overhead. :data:`OP_BENCHMARKS` is keyed by the op table's names
(:data:`dynenc.ops.OPS`); every forward op but ``scatter_rows`` (the inverse of ``gather_rows``,
the same traffic) has a row. torch's own kernels for a variant of an op's work (a scatter
without gate; FlashAttention's varlen kernel in bf16, CUDA only) are timed next to it.

Every case carries a model of the least work its call must do (:class:`~..harness.Work`,
computed once when the case is built): bytes read + written for the memory-bound ops, FLOPs
for attention and the layer. Each implementation of an op is credited with the same work, so
the rows' GB/s and TFLOP/s are useful throughput, whatever padding or copies a peer adds."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.varlen import varlen_attn

from dynenc import ops as native_ops
from dynenc.layer import DynamicConformerLayer
from dynenc.model import DynamicConformer

from ..harness import Prepared, Work
from ..workload import BenchConfig, Workload, padding_mask
from .base import Builder, Case, Figure, Ratio, under_inference


def _op(make: Callable[[Workload], Tuple[Callable[[], Any], Work]]) -> Builder:
    """A micro-benchmark: ``make(workload)`` returns the call, repeated inside a measurement,
    and the least work it must do."""

    def build(w: Workload) -> Prepared:
        call, work = make(w)
        return Prepared(under_inference(call), repeat_inside=True, work=work)

    return build


def _nbytes(*tensors: Optional[Tensor]) -> int:
    """Bytes of ``tensors`` (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _scatter_bytes(x: Tensor, y: Tensor, gate: Optional[Tensor], index: Tensor) -> int:
    """Gated residual scatter: read ``x [N, D]`` (each row copied or blended), ``y [M, D]``,
    ``gate [M]`` (if any) and ``index [M]``; write ``out [N, D]``."""
    return 2 * _nbytes(x) + _nbytes(y, gate, index)


def _gather_bytes(x: Tensor, index: Tensor) -> int:
    """Row gather: read the ``M`` indexed rows of ``x [N, D]`` and ``index [M]``; write ``[M, D]``."""
    return 2 * index.numel() * x.shape[1] * x.element_size() + _nbytes(index)


def _dwconv_bytes(x: Tensor, weight: Tensor, bias: Tensor) -> int:
    """Depthwise conv: read ``x [N, C]`` once (a row's K - 1 neighbours come from cache), the
    weight ``[C, K]`` and bias ``[C]``; write ``[N, C]``."""
    return 2 * _nbytes(x) + _nbytes(weight, bias)


def _attention_flops(cu_seqlens: Tensor, num_heads: int, head_dim: int) -> float:
    """Forward FLOPs over the packed, unpadded sequences: ``QK^T`` and ``PV``, ``2 L^2 Dh`` each
    per sequence of length L and head."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return 4.0 * float(lengths.square().sum()) * num_heads * head_dim


#: The peak attention is held against, by dtype. fp32 runs on the tensor cores of every GPU in
#: the peak table (sm_80+) as 3xTF32 — dynenc's Triton kernels and torch's memory-efficient SDPA
#: (CUTLASS OpMultiplyAddFastF32) alike — three TF32 products per fp32 one: a third of the TF32
#: peak is their ceiling.
_ATTENTION_MATH = {torch.float32: "tf32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _plan_bytes(row_mask: Tensor, cu_seqlens: Tensor) -> int:
    """Routing plan: read the bool ``[L, N]`` row mask and ``cu_seqlens``; write the plan (its
    outputs' sizes from one reference call: the row count S is data-dependent)."""
    return _nbytes(row_mask, cu_seqlens, *native_ops.reference("build_plan")(row_mask, cu_seqlens))


def _add_layer_norm_bytes(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor) -> int:
    """Add + LayerNorm: read ``x``, ``residual`` ``[N, D]``, ``weight``, ``bias`` ``[D]``; write
    the sum and the normed rows ``[N, D]`` (the native op's fp32 mean / rstd, kept for the
    backward, are not credited: the function returns neither)."""
    return _nbytes(x, residual, weight, bias) + 2 * _nbytes(x)


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


def _layer(w: Workload) -> Tuple[Callable[[], Any], Work]:
    """One D = op_dim Conformer layer on the active rows of the route; its FLOPs are the
    model's estimate (:meth:`DynamicConformer.layer_flops`), held against the fp32 peak unless
    torch lets its matmuls (most of them) use TF32."""
    config = w.config
    dim, heads, ffn_dim, kernel = config.op_dim, config.model.num_heads, config.op_ffn_dim, config.model.kernel_size
    torch.manual_seed(config.seed)
    layer = DynamicConformerLayer(dim, ffn_dim, heads, kernel).to(w.device).eval()
    rows, route = w.op_rows["packed"], w.op_rows["route"]
    active = rows.x.index_select(0, route.index)
    sum_sq_lengths = float(route.batch.lengths.double().square().sum())
    flops = DynamicConformer(dim, heads, ffn_dim, 0, kernel).layer_flops(route.num_rows, sum_sq_lengths)
    math = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return (lambda: layer(active, route.batch)), Work(flops=flops, math=math)


def _gated_scatter(kind: str) -> Builder:
    def make(w: Workload) -> Tuple[Callable[[], Any], Work]:
        x, route = w.op_rows["packed"].x, w.op_rows["route"]
        y = torch.randn(route.num_rows, x.shape[1], generator=torch.Generator().manual_seed(5)).to(w.device)
        gate = torch.rand(route.num_rows, generator=torch.Generator().manual_seed(6)).to(w.device)
        if kind == "index_copy":  # torch's row scatter: the ungated replacement (gate = 1), credited no gate
            work = Work(bytes=_scatter_bytes(x, y, None, route.index))
            return (lambda: x.clone().index_copy_(0, route.index, y)), work
        impl = native_ops.gated_residual_scatter if kind == "native" else native_ops.reference("gated_residual_scatter")
        return (lambda: impl(x, y, gate, route.index)), Work(bytes=_scatter_bytes(x, y, gate, route.index))

    return _op(make)


def _gather(native: bool) -> Builder:
    def make(w: Workload) -> Tuple[Callable[[], Any], Work]:
        x, index = w.op_rows["packed"].x, w.op_rows["route"].index
        # the reference is x.index_select(0, index)
        impl = native_ops.gather_rows if native else native_ops.reference("gather_rows")
        return (lambda: impl(x, index)), Work(bytes=_gather_bytes(x, index))

    return _op(make)


def _dwconv(kind: str) -> Builder:
    def make(w: Workload) -> Tuple[Callable[[], Any], Work]:
        packed, weight, bias = _dwconv_inputs(w)
        work = Work(bytes=_dwconv_bytes(packed.x, weight, bias))  # the padded peer: credited the packed rows only
        if kind == "native":
            return (lambda: native_ops.varlen_dwconv1d(packed.x, packed.batch.cu_seqlens, weight, bias)), work
        if kind == "per-sequence":
            bounds = packed.batch.cu_seqlens.tolist()
            return (lambda: _dwconv_per_sequence(packed.x, bounds, weight, bias)), work
        padded = w.op_rows["padded"].transpose(1, 2).contiguous()
        return (lambda: _dwconv_padded(padded, weight, bias)), work

    return _op(make)


def _attention(kind: str) -> Builder:
    def make(w: Workload) -> Tuple[Callable[[], Any], Work]:
        packed, (q, k, v), dense, keep = _attention_inputs(w)
        batch = packed.batch
        # The padded peer is credited with the packed sequences' FLOPs, not the padding it also
        # computes: every row reports useful throughput.
        flops = _attention_flops(batch.cu_seqlens, *q.shape[1:])
        if kind == "varlen_attn":  # FlashAttention needs fp16 / bf16
            half = [t.to(torch.bfloat16) for t in (q, k, v)]
            cu_seqlens, max_seqlen = batch.cu_seqlens, batch.max_seqlen
            return ((lambda: varlen_attn(*half, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)),
                    Work(flops=flops, math=_ATTENTION_MATH[torch.bfloat16]))
        work = Work(flops=flops, math=_ATTENTION_MATH[q.dtype])
        if kind == "native":
            return (lambda: native_ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)), work
        if kind == "padded":
            return (lambda: F.scaled_dot_product_attention(*dense, attn_mask=keep)), work
        bounds = batch.cu_seqlens.tolist()
        return (lambda: torch.cat([
            F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])])), work

    return _op(make)


def _flash_attention_runs(head_dim: int) -> Callable[[torch.device], bool]:
    """Whether torch's FlashAttention varlen kernel runs bf16 at ``head_dim`` on a device:
    dynenc's own routing decision for CUDA attention (NVIDIA sm_80+, a FlashAttention head dim)."""

    def runs_on(device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        from dynenc.kernels._utils import device_arch  # dynenc.kernels imports Triton: CUDA only
        from dynenc.kernels.attention import uses_flash_attention

        return uses_flash_attention(torch.bfloat16, head_dim, device_arch(torch.empty(0, device=device)))

    return runs_on


def _plan(kind: str) -> Builder:
    def make(w: Workload) -> Tuple[Callable[[], Any], Work]:
        rows = w.op_rows
        cu_seqlens = rows["packed"].batch.cu_seqlens
        # the routing step's least traffic is its plan's: the per-layer sub-batches are views of it
        work = Work(bytes=_plan_bytes(rows["row_mask"], cu_seqlens))
        if kind == "routes":  # the whole routing step of a forward: plan + per-layer sub-batches
            return rows["schedule"].routes, work
        impl = native_ops.build_plan if kind == "native" else native_ops.reference("build_plan")
        return (lambda: impl(rows["row_mask"], cu_seqlens)), work

    return _op(make)


def _add_layer_norm(native: bool) -> Builder:
    def make(w: Workload) -> Tuple[Callable[[], Any], Work]:
        x = w.op_rows["packed"].x
        generator = torch.Generator().manual_seed(w.config.seed + 7)
        residual, weight, bias = (torch.randn(shape, generator=generator).to(w.device)
                                  for shape in (x.shape, x.shape[1:], x.shape[1:]))
        # the reference is x + 0.5 * residual, then F.layer_norm of the sum
        impl = native_ops.add_layer_norm if native else native_ops.reference("add_layer_norm")
        work = Work(bytes=_add_layer_norm_bytes(x, residual, weight, bias))
        return (lambda: impl(x, residual, 0.5, weight, bias, 1e-5)), work

    return _op(make)


#: op name (dynenc.ops.OPS) -> (label, ((implementation, builder), ...)); the first implementation
#: is the native op, the others the eager torch compositions it replaces.
OP_BENCHMARKS: Dict[str, Tuple[str, Tuple[Tuple[str, Builder], ...]]] = {
    "gated_residual_scatter": ("gated scatter", (
        ("native", _gated_scatter("native")), ("eager clone+index_select+index_copy", _gated_scatter("reference")))),
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


def _torch_kernels(config: BenchConfig) -> Dict[str, List[Case]]:
    """op label -> torch's own kernels for a variant of the op's work (no gate; bf16): timed for
    their throughput next to the op's rows, not ratioed against it (another function)."""
    head_dim = config.op_dim // config.model.num_heads
    return {"gated scatter": [Case("ops", "gated scatter torch clone+index_copy_ (no gate)", "torch",
                                   _gated_scatter("index_copy"))],
            "attention": [Case("ops", "attention torch varlen_attn (bf16)", "torch", _attention("varlen_attn"),
                               runs_on=_flash_attention_runs(head_dim))]}


def cases(config: BenchConfig) -> List[Case]:
    torch_kernels = _torch_kernels(config)
    result = []
    for op, impls in OPS.items():
        result += [Case("ops", f"{op} {impl}", "dynenc" if impl == "native" else "eager", build)
                   for impl, build in impls]
        result += torch_kernels.get(op, [])
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
