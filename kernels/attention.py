"""Block-diagonal softmax attention over packed sequences, FlashAttention-2 style.

Programs are (sequence, block) pairs laid out back to back on grid axis 0 (heads on axis 1),
so ragged batches launch only the blocks they have (plus at most B idle programs, from a
bound that needs no host sync). A program finds its pair by bisection over ``cu_blocks``,
the exclusive prefix sum of ``cdiv(length, BLOCK)`` (a few tiny device ops, no sync).
Scores are kept in log2 units (``exp2``); the saved logsumexp is natural-log, fp32 ``[N, H]``.

On NVIDIA, fp16/bf16 with a head dim FlashAttention-2 supports go to torch's ``varlen_attn``
and its backward instead (:func:`uses_flash_attention`, the one routing decision); the Triton
kernels serve fp32/fp64, the other head dims, AMD, the interpreter and every biased call.

WavLM's gated relative-position bias (``HAS_BIAS``): the launchers gather the table through the
buckets once per call into ``rel`` (opmath ``[H, 2P - 1]``, ``rel[h, r] = E[buckets[r], h]``);
each score tile adds ``g[i, h] * rel[h, p_j - p_i + P - 1]`` (one gather per score from a
vector that stays in L1/L2). No ``[H, T, T]`` bias exists. The dQ pass also reduces the gate's
gradient as a row sum and adds ``g * dS`` into an opmath ``[H, 2P - 1]`` buffer with
``tl.atomic_add`` (one address per relative distance, not per bucket: far fewer collisions),
which a final ``index_add_`` folds into the table's buckets.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.nn.attention.varlen import AuxRequest, varlen_attn

from ._utils import device_arch, find_segment, on_device_of_first_arg, opmath, opmath_dtype, search_steps, sm_version
from .specialization import KernelCall

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
DELTA_BLOCK_R = 64
# Data-dependent ints: the JIT would compile a variant per value class (== 1, % 16) otherwise.
RAGGED_INTS = ["num_seqs", "num_steps", "num_positions"]


class AttentionConfig(NamedTuple):
    """Tiles and launch options of the attention kernels for one (arch, dtype, head dim).

    ``block``: query and key rows per tile (one for all three kernels: they share the
    ``cu_blocks`` program map); ``block_d``: the head dim padded to 16/32/64/128 (a constexpr,
    the tail masked); ``forward`` / ``backward``: ``(num_warps, num_stages)`` of the forward
    and of the two backward kernels."""

    block: int
    block_d: int
    forward: Tuple[int, int]
    backward: Tuple[int, int]

    def launch(self, kernel_options: Tuple[int, int]) -> dict:
        warps, stages = kernel_options
        return dict(BLOCK=self.block, BLOCK_D=self.block_d, num_warps=warps, num_stages=stages)


def padded_head_dim(head_dim: int) -> int:
    """16, 32, 64, 128 (the next one up; tl.dot needs every dim >= 16), then powers of two."""
    return max(16, triton.next_power_of_2(head_dim))


def attention_config(arch: Optional[str], dtype: torch.dtype, head_dim: int, has_bias: bool = False) -> AttentionConfig:
    """Tiles whose shared memory fits every arch's per-block limit and whose registers do not
    spill (``python -m dynenc.kernels.report`` checks each (arch, dtype, head dim)).

    fp32 dots run as 3xTF32, which splits every operand into high and low parts held in
    registers: tiles of ``block x block_d <= 2048`` elements (64 x 64 ones spilled up to
    11 KB in the backward) without prefetch stages stay within the registers ptxas gives a
    thread. The forward runs 4 warps up to Dh = 64 (8 warps were capped at 128 registers and
    spilled 12-28 B at d36 / d64 on sm_80-89) and 8 warps at Dh = 128 (4 spilled 16 B on
    sm_80); the backward 8 warps. On sm_90 the forward measured spill-free with 4 warps and
    2 stages and the backward with 2 stages (1 spilled). fp16 / bf16 (Triton only for head dims FlashAttention
    lacks, and on AMD): 64-row tiles up to Dh = 64, 8 warps and one stage in the backward
    (4 warps spilled on sm_80 / sm_86 / sm_89).

    ``has_bias`` (the relative-position bias: a gathered score tile, its int32 offsets and, in
    the dQ pass, the atomics' addresses more): 16-row tiles in fp32 and 32-row ones in fp16 /
    bf16 at every head dim. The plain tiles were at ptxas' 255-register cap in the backward and
    spilled 16-130 B (fp32, Dh <= 64) and 200-450 B (fp16 / bf16 dQ, Dh <= 64) with the bias;
    on sm_90 the fp32 Dh = 128 backward takes one stage (two spilled 108 B in dQ).
    """
    block_d = padded_head_dim(head_dim)
    if dtype in (torch.float32, torch.float64):
        hopper = sm_version(arch) == 90
        forward = (4, 2) if hopper else ((4, 1) if block_d <= 64 else (8, 1))
        block = 16 if has_bias else min(64, max(16, 2048 // block_d))
        # sm_90 with the bias at Dh = 128: 2 backward stages spilled 108 B in dQ.
        stages = 2 if hopper and not (has_bias and block_d > 64) else 1
        return AttentionConfig(block, block_d, forward=forward, backward=(8, stages))
    block = 32 if has_bias or block_d > 64 else 64
    return AttentionConfig(block, block_d, forward=(4, 2), backward=(8, 1))


def _dot_precision(arch: Optional[str], dtype: torch.dtype) -> str:
    """fp32 operands on NVIDIA: 3xTF32 (fp32-level accuracy on tensor cores; plain TF32 would
    lose ~3 digits). Everything else: IEEE (AMD, fp64, interpreter; fp16/bf16 ignore it)."""
    return "tf32x3" if sm_version(arch) and dtype == torch.float32 else "ieee"


def uses_flash_attention(dtype: torch.dtype, head_dim: int, arch: Optional[str]) -> bool:
    """Whether the CUDA launch goes to torch's FlashAttention (``varlen_attn``) instead of the
    Triton kernel: fp16/bf16 on NVIDIA sm_80+ with a head dim FlashAttention-2 supports
    (multiple of 8, at most 256) — expected 1.5-3x faster there. fp32/fp64, other head dims,
    AMD and the interpreter (``arch`` None) use the Triton kernels."""
    return (dtype in (torch.float16, torch.bfloat16) and sm_version(arch) >= 80
            and head_dim % 8 == 0 and head_dim <= 256)


@triton.jit
def _block_coords(cu_seqlens, cu_blocks, num_seqs, num_steps, BLOCK: tl.constexpr):
    """``(start, end, block_start)`` of this program's sequence and block;
    ``block_start >= end`` for the spare programs past the last block."""
    pid = tl.program_id(0)
    seq = find_segment(cu_blocks, pid, num_seqs, num_steps)
    start = tl.load(cu_seqlens + seq)
    end = tl.load(cu_seqlens + seq + 1)
    return start, end, start + (pid - tl.load(cu_blocks + seq)) * BLOCK


@triton.jit
def _head_tile(rows, row_ok, row_stride, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of the ``[rows, BLOCK_D]`` tile of head ``program_id(1)`` in an
    ``[N, H, HEAD_DIM]`` tensor with heads and columns contiguous and rows ``row_stride``
    apart (columns past ``HEAD_DIM`` masked)."""
    cols = tl.arange(0, BLOCK_D)
    offs = rows.to(tl.int64)[:, None] * row_stride + tl.program_id(1) * HEAD_DIM + cols[None, :]
    return offs, row_ok[:, None] & (cols < HEAD_DIM)[None, :]


@triton.jit
def _row_stats(stats, rows, row_ok, num_heads, ACC: tl.constexpr):
    """Per-(row, head) statistics (logsumexp, delta, bias gate) of head ``program_id(1)`` from ``[N, H]``."""
    return tl.load(stats + rows.to(tl.int64) * num_heads + tl.program_id(1), mask=row_ok, other=0.0).to(ACC)


@triton.jit
def _positions(positions, rows, row_ok):
    """int32 positions of ``rows`` (0 for masked rows)."""
    return tl.load(positions + rows, mask=row_ok, other=0).to(tl.int32)


@triton.jit
def _rel_offsets(positions, pos_m, rows_n, n_ok, num_positions):
    """int32 offsets into ``rel`` ``[H, 2P - 1]`` of a ``[BLOCK_M, BLOCK_N]`` score tile of head
    ``program_id(1)``: ``h * (2P - 1) + p_j - p_i + P - 1`` (in range for masked rows too, which
    read position 0; int32, as ``H * (2P - 1) < 2^31``: half the registers of int64 offsets)."""
    base = tl.program_id(1) * (2 * num_positions - 1) + (num_positions - 1)
    return base + _positions(positions, rows_n, n_ok)[None, :] - pos_m[:, None]


@triton.jit(do_not_specialize=RAGGED_INTS)
def _attn_fwd_kernel(
    q, k, v, out, lse, cu_seqlens, cu_blocks, num_seqs, num_steps, scale, num_heads, qkv_stride,
    rel, gate, positions, num_positions,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Online-softmax forward of one ``[BLOCK, Dh]`` query block of one head.

    Shapes: ``q``/``k``/``v``/``out`` ``[N, H, Dh]`` (``q``/``k``/``v`` rows ``qkv_stride``
    apart, e.g. views of one packed projection; ``out`` contiguous), ``lse`` fp32 ``[N, H]``. Grid
    ``(num_block_programs, H)``. Traffic: reads the query block once and the sequence's K/V
    once per query block (``T / BLOCK`` times per K/V element, mostly from L2), writes ``out``
    once and 4 B of ``lse`` per (row, head). FLOPs ``4 * T^2 * Dh`` per sequence and head.
    Statistics and the output accumulator are fp32 (fp64 for fp64 inputs).

    ``HAS_BIAS``: ``rel`` opmath ``[H, 2P - 1]``, ``gate`` ``[N, H]`` (q's dtype), ``positions``
    int64 ``[N]``, ``num_positions`` P; adds ``g_i * rel[h, p_j - p_i + P - 1]`` to each score
    (an extra 8 B per key row and one L1/L2 gather per score).
    """
    ACC: tl.constexpr = opmath(q.dtype.element_ty)
    start, end, m0 = _block_coords(cu_seqlens, cu_blocks, num_seqs, num_steps, BLOCK)
    if m0 >= end:
        return
    lanes = tl.arange(0, BLOCK)
    rows_m = m0 + lanes
    q_offs, q_mask = _head_tile(rows_m, rows_m < end, qkv_stride, HEAD_DIM, BLOCK_D)
    q_tile = tl.load(q + q_offs, mask=q_mask, other=0.0)
    qk_scale = scale * LOG2E  # softmax via exp2
    if HAS_BIAS:
        pos_m = _positions(positions, rows_m, rows_m < end)
        gate_m = _row_stats(gate, rows_m, rows_m < end, num_heads, ACC) * LOG2E
    m_i = tl.full([BLOCK], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK], dtype=ACC)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    for n0 in range(start, end, BLOCK):
        rows_n = n0 + lanes
        n_ok = rows_n < end
        kv_offs, kv_mask = _head_tile(rows_n, n_ok, qkv_stride, HEAD_DIM, BLOCK_D)
        k_tile = tl.load(k + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale
        if HAS_BIAS:
            rel_tile = tl.load(rel + _rel_offsets(positions, pos_m, rows_n, n_ok, num_positions))
            s += gate_m[:, None] * rel_tile
        s = tl.where(n_ok[None, :], s, float("-inf"))  # every key block has a valid key: m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_tile = tl.load(v + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION, out_dtype=ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    out_offs = _head_tile(rows_m, rows_m < end, num_heads * HEAD_DIM, HEAD_DIM, BLOCK_D)[0]
    tl.store(out + out_offs, acc.to(out.dtype.element_ty), mask=q_mask)
    lse_m = (m_i + tl.log2(l_i)) * LN2
    tl.store(lse + rows_m.to(tl.int64) * num_heads + tl.program_id(1), lse_m.to(tl.float32), mask=rows_m < end)


@triton.jit(do_not_specialize=["num_rows"])
def _attn_bwd_delta_kernel(out, grad_out, delta, num_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """``delta[r] = sum_d grad_out[r, d] * out[r, d]`` over the ``N * H`` rows of
    ``HEAD_DIM`` (``BLOCK_D``: padded), accumulated and stored in fp32 (fp64 for fp64). Grid
    ``cdiv(N * H, BLOCK_R)``. Traffic: reads ``out`` and ``grad_out`` once, writes 4 B per
    (row, head).
    """
    ACC: tl.constexpr = opmath(out.dtype.element_ty)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
    o = tl.load(out + offs, mask=mask, other=0.0).to(ACC)
    do = tl.load(grad_out + offs, mask=mask, other=0.0).to(ACC)
    tl.store(delta + rows, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _probs_and_dscores(q_tile, k_tile, v_tile, do_tile, lse_m, delta_m, valid, qk_scale, bias,
                       DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Recomputed probabilities ``p`` and score gradients ``ds = p * (dO V^T - delta)`` of a
    ``[BLOCK_M, BLOCK_N]`` tile (zero outside ``valid``), in the dtype of ``lse_m``; ``bias``
    (log2 units) is added to the scores when ``HAS_BIAS``."""
    s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION, out_dtype=lse_m.dtype) * qk_scale
    if HAS_BIAS:
        s += bias
    p = tl.where(valid, tl.exp2(s - lse_m[:, None] * LOG2E), 0.0)
    dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION, out_dtype=lse_m.dtype)
    return p, p * (dp - delta_m[:, None])


@triton.jit(do_not_specialize=RAGGED_INTS)
def _attn_bwd_dkdv_kernel(
    q, k, v, grad_out, lse, delta, grad_k, grad_v, cu_seqlens, cu_blocks, num_seqs, num_steps, scale, num_heads,
    qkv_stride, rel, gate, positions, num_positions,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """``dV = P^T dO`` and ``dK = scale * dS^T Q`` for one key block of one head, looping over
    the sequence's query blocks (no atomics). Grid ``(num_block_programs, H)``. Traffic: reads
    the K/V block once and Q, dO, lse, delta once per key block (mostly L2), writes dK, dV once.
    ``HAS_BIAS``: the scores are recomputed with the bias (as the forward), which also reads the
    query blocks' gates and positions.
    """
    ACC: tl.constexpr = opmath(q.dtype.element_ty)
    start, end, n0 = _block_coords(cu_seqlens, cu_blocks, num_seqs, num_steps, BLOCK)
    if n0 >= end:
        return
    lanes = tl.arange(0, BLOCK)
    rows_n = n0 + lanes
    n_ok = rows_n < end
    kv_offs, kv_mask = _head_tile(rows_n, n_ok, qkv_stride, HEAD_DIM, BLOCK_D)
    k_tile = tl.load(k + kv_offs, mask=kv_mask, other=0.0)
    v_tile = tl.load(v + kv_offs, mask=kv_mask, other=0.0)
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    for m0 in range(start, end, BLOCK):
        rows_m = m0 + lanes
        m_ok = rows_m < end
        q_offs, q_mask = _head_tile(rows_m, m_ok, qkv_stride, HEAD_DIM, BLOCK_D)
        do_offs = _head_tile(rows_m, m_ok, num_heads * HEAD_DIM, HEAD_DIM, BLOCK_D)[0]
        q_tile = tl.load(q + q_offs, mask=q_mask, other=0.0)
        do_tile = tl.load(grad_out + do_offs, mask=q_mask, other=0.0)
        if HAS_BIAS:
            pos_m = _positions(positions, rows_m, m_ok)
            gate_m = _row_stats(gate, rows_m, m_ok, num_heads, ACC) * LOG2E
            bias = gate_m[:, None] * tl.load(rel + _rel_offsets(positions, pos_m, rows_n, n_ok, num_positions))
        else:
            bias = 0.0
        p, ds = _probs_and_dscores(q_tile, k_tile, v_tile, do_tile, _row_stats(lse, rows_m, m_ok, num_heads, ACC),
                                   _row_stats(delta, rows_m, m_ok, num_heads, ACC), m_ok[:, None] & n_ok[None, :],
                                   qk_scale, bias, DOT_PRECISION, HAS_BIAS)
        dv += tl.dot(tl.trans(p.to(do_tile.dtype)), do_tile, input_precision=DOT_PRECISION, out_dtype=ACC)
        dk += tl.dot(tl.trans(ds.to(q_tile.dtype)), q_tile, input_precision=DOT_PRECISION, out_dtype=ACC)
    grad_offs = _head_tile(rows_n, n_ok, num_heads * HEAD_DIM, HEAD_DIM, BLOCK_D)[0]
    tl.store(grad_k + grad_offs, (dk * scale).to(grad_k.dtype.element_ty), mask=kv_mask)
    tl.store(grad_v + grad_offs, dv.to(grad_v.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=RAGGED_INTS)
def _attn_bwd_dq_kernel(
    q, k, v, grad_out, lse, delta, grad_q, cu_seqlens, cu_blocks, num_seqs, num_steps, scale, num_heads, qkv_stride,
    rel, gate, positions, num_positions, grad_gate, grad_rel,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """``dQ = scale * dS K`` for one query block of one head, looping over the sequence's key
    blocks. Grid ``(num_block_programs, H)``. Traffic: reads Q, dO, lse, delta once and K/V
    once per query block (mostly L2), writes dQ once.

    ``HAS_BIAS``: also ``grad_gate[i, h] = sum_j dS_ij rel[h, p_j - p_i + P - 1]`` (``[N, H]``,
    the gate's dtype, written once) and ``grad_rel[h, p_j - p_i + P - 1] += g_i dS_ij`` (opmath
    ``[H, 2P - 1]``, zero-filled by the launcher; one relaxed atomic add per score).
    """
    ACC: tl.constexpr = opmath(q.dtype.element_ty)
    start, end, m0 = _block_coords(cu_seqlens, cu_blocks, num_seqs, num_steps, BLOCK)
    if m0 >= end:
        return
    lanes = tl.arange(0, BLOCK)
    rows_m = m0 + lanes
    m_ok = rows_m < end
    q_offs, q_mask = _head_tile(rows_m, m_ok, qkv_stride, HEAD_DIM, BLOCK_D)
    out_offs = _head_tile(rows_m, m_ok, num_heads * HEAD_DIM, HEAD_DIM, BLOCK_D)[0]
    q_tile = tl.load(q + q_offs, mask=q_mask, other=0.0)
    do_tile = tl.load(grad_out + out_offs, mask=q_mask, other=0.0)
    lse_m = _row_stats(lse, rows_m, m_ok, num_heads, ACC)
    delta_m = _row_stats(delta, rows_m, m_ok, num_heads, ACC)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    if HAS_BIAS:
        pos_m = _positions(positions, rows_m, m_ok)
        gate_m = _row_stats(gate, rows_m, m_ok, num_heads, ACC)
        dgate = tl.zeros([BLOCK], dtype=ACC)
    for n0 in range(start, end, BLOCK):
        rows_n = n0 + lanes
        n_ok = rows_n < end
        kv_offs, kv_mask = _head_tile(rows_n, n_ok, qkv_stride, HEAD_DIM, BLOCK_D)
        k_tile = tl.load(k + kv_offs, mask=kv_mask, other=0.0)
        v_tile = tl.load(v + kv_offs, mask=kv_mask, other=0.0)
        valid = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            rel_offs = _rel_offsets(positions, pos_m, rows_n, n_ok, num_positions)
            rel_tile = tl.load(rel + rel_offs)
            bias = (gate_m * LOG2E)[:, None] * rel_tile
        else:
            bias = 0.0
        _, ds = _probs_and_dscores(q_tile, k_tile, v_tile, do_tile, lse_m, delta_m, valid, qk_scale, bias,
                                   DOT_PRECISION, HAS_BIAS)
        if HAS_BIAS:  # before the dot, so the rel tile and its offsets are dead during it
            dgate += tl.sum(ds * rel_tile, axis=1)
            tl.atomic_add(grad_rel + rel_offs, gate_m[:, None] * ds, mask=valid, sem="relaxed")
        dq += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PRECISION, out_dtype=ACC)
    tl.store(grad_q + out_offs, (dq * scale).to(grad_q.dtype.element_ty), mask=q_mask)
    if HAS_BIAS:
        tl.store(grad_gate + rows_m.to(tl.int64) * num_heads + tl.program_id(1),
                 dgate.to(grad_gate.dtype.element_ty), mask=m_ok)


def _launch_plan(q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, has_bias: bool):
    """``(grid, sequence args, config, constexprs)`` shared by the attention kernels."""
    num_rows, num_heads, head_dim = q.shape
    arch = device_arch(q)
    config = attention_config(arch, q.dtype, head_dim, has_bias)
    num_seqs = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    cu_blocks = torch.zeros(num_seqs + 1, dtype=torch.int32, device=q.device)
    torch.cumsum((lengths + config.block - 1) // config.block, 0, dtype=torch.int32, out=cu_blocks[1:])
    # sum_b cdiv(len_b, BLOCK) <= min(cdiv(N, BLOCK) + B, B * cdiv(max_seqlen, BLOCK)): no sync.
    programs = min(triton.cdiv(num_rows, config.block) + num_seqs,
                   num_seqs * triton.cdiv(max(max_seqlen, 0), config.block))
    args = (cu_seqlens, cu_blocks, num_seqs, search_steps(num_seqs))
    constexprs = dict(HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(arch, q.dtype))
    return (programs, num_heads), args, config, constexprs


def _qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``(q, k, v, row_stride)`` with heads and columns contiguous and one row stride: views of
    one packed ``[N, 3, H, Dh]`` projection qualify as they are (no copy), others are copied."""
    if not (q.stride(0) == k.stride(0) == v.stride(0)
            and all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (q, k, v))):
        q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v, q.stride(0)


class _BiasArgs(NamedTuple):
    """The kernels' bias arguments: ``rel`` opmath ``[H, 2P - 1]``, ``gate`` ``[N, H]``,
    ``positions`` int64 ``[N]``, ``num_positions`` P (placeholders without a bias)."""

    rel: torch.Tensor
    gate: torch.Tensor
    positions: torch.Tensor
    num_positions: int

    @property
    def present(self) -> bool:
        return self.num_positions > 0


def _bias_args(bias_table, bias_buckets, bias_gate, positions, placeholder: torch.Tensor) -> _BiasArgs:
    """``rel[h, r] = bias_table[bias_buckets[r], h]`` (one small gather per call) and the other
    bias arguments, or placeholders (never read: ``HAS_BIAS`` is off) without a bias."""
    if bias_table is None:
        return _BiasArgs(placeholder, placeholder, placeholder, 0)
    rel = bias_table.to(opmath_dtype(bias_table.dtype)).index_select(0, bias_buckets).t().contiguous()
    return _BiasArgs(rel, bias_gate.contiguous(), positions.contiguous(), (bias_buckets.numel() + 1) // 2)


@on_device_of_first_arg
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float, bias_table: Optional[torch.Tensor] = None,
                     bias_buckets: Optional[torch.Tensor] = None, bias_gate: Optional[torch.Tensor] = None,
                     positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> ``(out [N, H, Dh], logsumexp fp32 [N, H])``; ``max_seqlen`` must bound every length.
    With the bias (``bias_table [num_buckets, H]``, ``bias_buckets`` int64 ``[2P - 1]``,
    ``bias_gate [N, H]``, ``positions`` int64 ``[N]``) always the Triton kernel."""
    q, k, v, qkv_stride = _qkv_rows(q, k, v)
    cu_seqlens = cu_seqlens.contiguous()
    num_rows, num_heads, head_dim = q.shape
    if bias_table is None and uses_flash_attention(q.dtype, head_dim, device_arch(q)) and num_rows:
        out, lse = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               return_aux=AuxRequest(lse=True), scale=float(scale))
        return out, lse.t().contiguous()  # FlashAttention's logsumexp is [H, N]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_rows, num_heads), dtype=torch.float32, device=q.device)
    grid, seq_args, config, constexprs = _launch_plan(q, cu_seqlens, max_seqlen, bias_table is not None)
    if out.numel() and grid[0] > 0:
        bias = _bias_args(bias_table, bias_buckets, bias_gate, positions, lse)
        _attn_fwd_kernel[grid](q, k, v, out, lse, *seq_args, float(scale), num_heads, qkv_stride, *bias,
                               HAS_BIAS=bias.present, **constexprs, **config.launch(config.forward))
    return out, lse


def _no_bias_grads(q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bias gradients of a call without a bias: empty ``[0, H]`` tensors."""
    return (q.new_empty((0, q.shape[1])), q.new_empty((0, q.shape[1])))


@on_device_of_first_arg
def varlen_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, logsumexp: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                              scale: float, bias_table: Optional[torch.Tensor] = None,
                              bias_buckets: Optional[torch.Tensor] = None, bias_gate: Optional[torch.Tensor] = None,
                              positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """-> ``(grad_q, grad_k, grad_v, grad_bias_gate, grad_bias_table)``: ``[N, H, Dh]`` each,
    then ``[N, H]`` and ``[num_buckets, H]`` (empty ``[0, H]`` without a bias)."""
    q, k, v, qkv_stride = _qkv_rows(q, k, v)
    grad_out, out, cu_seqlens, logsumexp = (t.contiguous() for t in (grad_out, out, cu_seqlens, logsumexp))
    num_rows, num_heads, head_dim = q.shape
    if bias_table is None and uses_flash_attention(q.dtype, head_dim, device_arch(q)) and num_rows:
        # varlen_attn's own backward op; its rng state is unused without dropout (varlen_attn saves zeros).
        no_dropout_rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
        grads = torch.ops.torch_attn._varlen_attn_backward(
            grad_out, q, k, v, out, logsumexp.t().contiguous(), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            False, no_dropout_rng, float(scale))
        return (*grads, *_no_bias_grads(q))
    grad_q, grad_k, grad_v = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if bias_table is None:
        grad_gate, grad_table = _no_bias_grads(q)
    else:
        grad_gate = torch.empty(bias_gate.shape, dtype=bias_gate.dtype, device=q.device)
        grad_table = torch.zeros(bias_table.shape, dtype=bias_table.dtype, device=q.device)
    grid, seq_args, config, constexprs = _launch_plan(q, cu_seqlens, max_seqlen, bias_table is not None)
    if q.numel() == 0 or grid[0] == 0:
        return grad_q, grad_k, grad_v, grad_gate, grad_table
    delta = torch.empty((num_rows, num_heads), dtype=opmath_dtype(q.dtype), device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(num_rows * num_heads, DELTA_BLOCK_R),)](
        out, grad_out, delta, num_rows * num_heads, HEAD_DIM=head_dim, BLOCK_R=DELTA_BLOCK_R, BLOCK_D=config.block_d)
    bias = _bias_args(bias_table, bias_buckets, bias_gate, positions, delta)
    grad_rel = torch.zeros_like(bias.rel) if bias.present else delta
    scalars = (float(scale), num_heads, qkv_stride)
    launch = dict(**constexprs, HAS_BIAS=bias.present, **config.launch(config.backward))
    _attn_bwd_dkdv_kernel[grid](q, k, v, grad_out, logsumexp, delta, grad_k, grad_v, *seq_args, *scalars, *bias,
                                **launch)
    _attn_bwd_dq_kernel[grid](q, k, v, grad_out, logsumexp, delta, grad_q, *seq_args, *scalars, *bias,
                              grad_gate if bias.present else delta, grad_rel, **launch)
    if bias.present:
        # Table row b collects every relative distance whose bucket is b (opmath sums).
        table = torch.zeros(bias_table.shape, dtype=grad_rel.dtype, device=q.device)
        grad_table = table.index_add_(0, bias_buckets, grad_rel.t()).to(bias_table.dtype)
    return grad_q, grad_k, grad_v, grad_gate, grad_table


AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AOT_HEAD_DIMS = (36, 64, 128)
AOT_HEADS = 4


def aot_calls(arch: str, dtypes=AOT_DTYPES, head_dims=AOT_HEAD_DIMS):
    """The Triton launches of the launchers above on ``arch`` for each (dtype, head dim) the
    Triton path serves there (half precision with a FlashAttention head dim goes to torch
    without a bias), and the ``HAS_BIAS`` launches (variant ``...,bias``) for every dtype and
    head dim: biased calls always run the Triton kernels."""
    calls = []
    for dtype in dtypes:
        for head_dim in head_dims:
            constexprs = dict(HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(arch, dtype))
            t = torch.empty((1, AOT_HEADS, head_dim), dtype=dtype, device="meta")
            stats = torch.empty((1, AOT_HEADS), dtype=torch.float32, device="meta")
            cu = torch.empty(2, dtype=torch.int32, device="meta")
            seq = (cu, cu, 3, 2, 0.125, AOT_HEADS, 3 * AOT_HEADS * head_dim)  # q/k/v: packed projection views
            gate = torch.empty((1, AOT_HEADS), dtype=dtype, device="meta")
            positions = torch.empty(1, dtype=torch.int64, device="meta")
            rel = torch.empty((AOT_HEADS, 5), dtype=torch.float32, device="meta")  # opmath [H, 2P - 1]
            name = f"{str(dtype).removeprefix('torch.')},d{head_dim}"
            biases = [(f"{name},bias", (rel, gate, positions, 3), (gate, rel), True)]
            if not uses_flash_attention(dtype, head_dim, arch):
                biases.insert(0, (name, (stats, stats, stats, 0), (stats, stats), False))
            calls.append(KernelCall(_attn_bwd_delta_kernel, name, (t, t, stats, 3),
                                    dict(HEAD_DIM=head_dim, BLOCK_R=DELTA_BLOCK_R, BLOCK_D=padded_head_dim(head_dim))))
            for variant, bias, grads, has_bias in biases:
                config = attention_config(arch, dtype, head_dim, has_bias)
                backward = dict(**constexprs, HAS_BIAS=has_bias, **config.launch(config.backward))
                calls += [
                    KernelCall(_attn_fwd_kernel, variant, (t, t, t, t, stats, *seq, *bias),
                               dict(**constexprs, HAS_BIAS=has_bias, **config.launch(config.forward))),
                    KernelCall(_attn_bwd_dkdv_kernel, variant, (t, t, t, t, stats, stats, t, t, *seq, *bias),
                               backward),
                    KernelCall(_attn_bwd_dq_kernel, variant, (t, t, t, t, stats, stats, t, *seq, *bias, *grads),
                               backward),
                ]
    return calls
