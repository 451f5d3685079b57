"""Block-diagonal attention over packed sequences (``dynenc/ops/attention.py``):
varlen_attention (+ backward)."""
import math

import pytest
import torch
from op_testing import (ATOL, DEVICE, EXACT, MANY_LENGTHS, REDUCED, SEEDS, TRITON_DTYPES, AutogradChecks, BadCall,
                        assert_close, assert_close_float64, assert_every_row_written, assert_rejected,
                        bad_call_params, batch_id, cu_seqlens_of, float64_leaves, float64_sample, generator,
                        launcher, long_batch, ragged_cu_seqlens, randint, randn, reference_grads)

import dynenc
from dynenc import validation
from dynenc.ops import attention as attention_module
from dynenc.ops.attention import (check_varlen_attention, materialized_position_bias, reference_varlen_attention,
                                  relative_position_buckets)

ops = torch.ops.dynenc
GRAD_NAMES = ("grad_q", "grad_k", "grad_v")


def reference_logsumexp(q, k, cu_seqlens, scale):
    """float64 ``[N, H]`` logsumexp of each row's scores over its own sequence."""
    lse = torch.empty(q.shape[:2], dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("thd,shd->hts", q[start:end].double(), k[start:end].double()) * scale
        lse[start:end] = scores.logsumexp(-1).T
    return lse


def attention_grads(q, k, v, cu_seqlens, scale, grad_out):
    return reference_grads(lambda *t: reference_varlen_attention(*t, cu_seqlens, scale), (q, k, v), grad_out)


# ----------------------------------------------------------------------------- C++ vs reference
def attention_case(seed, dtype):
    gen = generator(seed)
    cu = ragged_cu_seqlens(gen, seed)
    h, dh = randint(gen, 1, 3), randint(gen, 1, 9)
    q, k, v = (randn(gen, int(cu[-1]), h, dh, dtype=dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(dh) if seed % 2 else float(torch.rand(1, generator=gen)) * 2
    return q, k, v, cu, scale


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_cpp_varlen_attention(dtype, seed):
    q, k, v, cu, scale = attention_case(seed, dtype)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    out, lse = ops.varlen_attention(q, k, v, cu, max_seqlen, scale)
    assert_close("out", reference_varlen_attention(q, k, v, cu, scale), out, ATOL[dtype])
    assert_close("logsumexp", reference_logsumexp(q, k, cu, scale), lse, 1e-5)
    assert lse.dtype == torch.float32

    grad_out = randn(generator(seed + 1), *q.shape, dtype=dtype)
    actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, max_seqlen, scale)
    for name, e, a in zip(GRAD_NAMES, attention_grads(q, k, v, cu, scale, grad_out), actual):
        assert_close(name, e, a, ATOL[dtype])


def test_cpp_varlen_attention_long_and_short():
    """A sequence long enough to get a parallel kernel call of its own, among short ones that
    are grouped per thread (the seeded cases are all short)."""
    gen = generator(11)
    cu = torch.tensor([0, 3, 303, 303, 310, 311], dtype=torch.int32)
    q, k, v = (randn(gen, 311, 2, 16) for _ in range(3))
    out, lse = ops.varlen_attention(q, k, v, cu, 300, 0.25)
    assert_close("out", reference_varlen_attention(q, k, v, cu, 0.25), out, 1e-5)
    assert_close("logsumexp", reference_logsumexp(q, k, cu, 0.25), lse, 1e-5)
    grad_out = randn(gen, 311, 2, 16)
    actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, 300, 0.25)
    for name, e, a in zip(GRAD_NAMES, attention_grads(q, k, v, cu, 0.25, grad_out), actual):
        assert_close(name, e, a, 1e-5)


@pytest.mark.parametrize("seed", SEEDS[::8])
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_cpp_varlen_attention_reduced(dtype, seed):
    q, k, v, cu, scale = attention_case(seed, dtype)
    out, _ = ops.varlen_attention(q, k, v, cu, 8, scale)
    expected = reference_varlen_attention(q.double(), k.double(), v.double(), cu, scale)
    assert_close("out", expected, out.double(), 3e-2, rtol=1e-2)


def test_cpp_every_output_row_written():
    x, _, _, _, cu = long_batch()
    heads = x.view(300, 3, 11)
    assert_every_row_written("varlen_attention",
                             lambda: ops.varlen_attention(heads, heads, heads, cu, 149, 0.3)[0].view(300, 33),
                             lambda: reference_varlen_attention(heads, heads, heads, cu, 0.3).view(300, 33),
                             numel=x.numel())


def test_cpp_non_contiguous_inputs():
    q = randn(generator(5), 3, 33, 4).transpose(0, 1)
    cu = torch.tensor([0, 5, 5, 33], dtype=torch.int32)
    assert_close("out", reference_varlen_attention(q, q, q, cu, 0.5), ops.varlen_attention(q, q, q, cu, 28, 0.5)[0],
                 1e-5)


def packed_projection(q, k, v):
    """q, k, v as views of one ``[N, 3, H, Dh]`` projection (the layer's layout: rows 3 * H * Dh apart)."""
    return torch.stack((q, k, v), 1).unbind(1)


def test_cpp_reads_packed_projection_views_as_contiguous_inputs():
    q, k, v, cu, scale = attention_case(3, torch.float32)
    views = packed_projection(q, k, v)
    assert not views[0].is_contiguous()
    grad_out = torch.randn_like(q)
    out, lse = ops.varlen_attention(q, k, v, cu, 200, scale)
    packed_out, packed_lse = ops.varlen_attention(*views, cu, 200, scale)
    assert packed_out.is_contiguous()
    assert torch.equal(out, packed_out) and torch.equal(lse, packed_lse)
    grads = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, 200, scale)
    packed_grads = ops.varlen_attention_backward(grad_out, *views, out, lse, cu, 200, scale)
    for name, want, got in zip(GRAD_NAMES, grads, packed_grads):
        assert got.is_contiguous() and torch.equal(want, got), name


# ----------------------------------------------------------------------------- Triton vs reference
# Multi-block sequences (> 64 rows, exact multiples of 64), T = 1, zero lengths, Dh padded to 16 /
# not a power of two, Dh > 64 (32-row blocks, 128-wide head tiles).
ATTENTION_CASES = [((5, 0, 70, 1, 3), 2, 12), ((1,), 1, 16), ((33, 20), 3, 8), ((40, 0), 1, 80),
                   ((3, 64, 129, 0, 128), 1, 16), (MANY_LENGTHS, 2, 4)]
ATTENTION_IDS = [f"{batch_id(c[0])}-H{c[1]}-Dh{c[2]}" for c in ATTENTION_CASES]
# float64 attention: the interface's scale and logsumexp are fp32, so ~1e-7 relative.
TOLERANCES = {
    torch.float64: dict(atol=1e-6, rtol=1e-6),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


def attention_inputs(case, dtype, seed=0):
    lengths, heads, head_dim = case
    gen = generator(seed)
    q, k, v = (randn(gen, sum(lengths), heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(3))
    return q, k, v, cu_seqlens_of(lengths), max(lengths), 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=ATTENTION_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_varlen_attention(dtype, case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, dtype)
    out, lse = launcher("varlen_attention")(q, k, v, cu_seqlens, max_seqlen, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    q64, k64, v64 = float64_leaves(q, k, v)
    cu_cpu = cu_seqlens.cpu()
    assert_close_float64("out", reference_varlen_attention(q64, k64, v64, cu_cpu, scale), out, TOLERANCES[dtype])
    assert_close_float64("logsumexp", reference_logsumexp(q64, k64, cu_cpu, scale), lse, TOLERANCES[torch.float32])


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=ATTENTION_IDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_varlen_attention_backward(dtype, case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, dtype)
    out, lse = launcher("varlen_attention")(q, k, v, cu_seqlens, max_seqlen, scale)
    grad_out = randn(generator(1), *q.shape, dtype=dtype, device=DEVICE)
    grads = launcher("varlen_attention_backward")(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    expected = attention_grads(*float64_leaves(q, k, v), cu_seqlens.cpu(), scale, grad_out.cpu().double())
    for name, want, got in zip(GRAD_NAMES, expected, grads):
        assert got.dtype == dtype, name
        assert_close_float64(name, want, got, TOLERANCES[dtype])


@pytest.mark.parametrize("case", ATTENTION_CASES[:3], ids=ATTENTION_IDS[:3])
def test_triton_reads_packed_projection_views_as_contiguous_inputs(case):
    q, k, v, cu_seqlens, max_seqlen, scale = attention_inputs(case, torch.float32)
    views = packed_projection(q, k, v)
    out, lse = launcher("varlen_attention")(q, k, v, cu_seqlens, max_seqlen, scale)
    packed_out, packed_lse = launcher("varlen_attention")(*views, cu_seqlens, max_seqlen, scale)
    assert packed_out.is_contiguous()
    assert torch.equal(out, packed_out) and torch.equal(lse, packed_lse)
    grad_out = randn(generator(1), *q.shape, device=DEVICE)
    backward = launcher("varlen_attention_backward")
    grads = backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    packed_grads = backward(grad_out, *views, out, lse, cu_seqlens, max_seqlen, scale)
    for name, want, got in zip(GRAD_NAMES, grads, packed_grads):
        assert got.is_contiguous() and torch.equal(want, got), name


# ----------------------------------------------------------------------------- registered autograd
def autograd_samples():
    gen, cu, _, _ = float64_sample(0)
    q, k, v = (torch.randn(11, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    qkv = torch.randn(11, 3, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    return {"varlen_attention": [(q, k, v, cu, 6, 0.5), (*qkv.unbind(1), cu, 6, 0.5)]}


class TestAutograd(AutogradChecks):
    samples = autograd_samples()

    @staticmethod
    def double_backward_refused(name, args):
        return True


# ----------------------------------------------------------------------------- bad inputs
_Q = torch.randn(8, 2, 4)
_CU = torch.tensor([0, 3, 8], dtype=torch.int32)
_NO_HEADS, _NO_HEAD_DIM = _Q[:, :0], _Q[..., :0]
BAD_CALLS = {
    "cu end": BadCall("varlen_attention", (_Q, _Q, _Q, torch.tensor([0, 7], dtype=torch.int32), 7, 1.0),
                      ValueError, "cu_seqlens", value=True),
    "k shape": BadCall("varlen_attention", (_Q, _Q[:7], _Q[:7], _CU, 5, 1.0), ValueError, "k"),
    "max_seqlen too small": BadCall("varlen_attention", (_Q, _Q, _Q, _CU, 4, 1.0), ValueError, "max_seqlen",
                                    value=True),
    "zero heads": BadCall("varlen_attention", (_NO_HEADS, _NO_HEADS, _NO_HEADS, _CU, 5, 1.0), ValueError, "q"),
    "head_dim 0": BadCall("varlen_attention", (_NO_HEAD_DIM, _NO_HEAD_DIM, _NO_HEAD_DIM, _CU, 5, 1.0), ValueError, "q"),
    "backward logsumexp dtype": BadCall("varlen_attention_backward",
                                        (_Q, _Q, _Q, _Q, _Q, torch.zeros(8, 2).double(), _CU, 5, 1.0),
                                        TypeError, "logsumexp"),
    "backward zero heads": BadCall("varlen_attention_backward", (*[_NO_HEADS] * 5, torch.zeros(8, 0), _CU, 5, 1.0),
                                   ValueError, "q"),
    "backward head_dim 0": BadCall("varlen_attention_backward", (*[_NO_HEAD_DIM] * 5, torch.zeros(8, 2), _CU, 5, 1.0),
                                   ValueError, "q"),
}


@pytest.mark.parametrize("bad,entry", bad_call_params(BAD_CALLS))
def test_bad_inputs_raise(bad, entry):
    """Zero heads / head_dim 0 raise ValueError (the C++ kernel divided by them: SIGFPE)."""
    assert_rejected(bad, entry)


# ----------------------------------------------------------------------------- relative-position bias
# WavLM's gated bias: score[i, j, h] += g[i, h] * E[bucket(p_j - p_i), h], never materialised by the
# kernels. 8 buckets, max distance 12: exact up to distance 1, log buckets beyond, so many relative
# distances share a table row (the table gradient sums them).
BIAS_BUCKETS, BIAS_MAX_DISTANCE = 8, 12
BIAS_GRAD_NAMES = (*GRAD_NAMES, "grad_bias_gate", "grad_bias_table")
# (lengths, heads, head_dim, frames dropped): with dropped frames each sequence's positions are a
# sorted random subset of [0, 2T], so they are not contiguous.
BIAS_CASES = {
    "ragged-H2": ((5, 0, 7, 1), 2, 8, False),
    "dropped-frames-H3": ((6, 9, 4), 3, 5, True),
    "empty-and-length-1-H1": ((0, 1, 0, 1, 3), 1, 4, True),
    "multi-block-H1": ((40, 21), 1, 16, True),
    "all-empty": ((0, 0), 2, 4, False),
}
# Longer sequences for the C++ kernel: several query blocks per (sequence, head) and work items
# of very different sizes.
CPP_BIAS_CASES = {**BIAS_CASES, "long-H3": ((300, 2, 150, 0, 41), 3, 16, True)}


def bias_inputs(case, dtype, seed=0, device="cpu"):
    """(q, k, v, cu_seqlens, max_seqlen, scale, bias_table, bias_buckets, bias_gate, positions):
    the positional arguments of ``dynenc::varlen_attention`` with a bias."""
    lengths, heads, head_dim, dropped = case
    gen = generator(seed)
    rows = sum(lengths)
    q, k, v = (randn(gen, rows, heads, head_dim, dtype=dtype, device=device) for _ in range(3))
    frames = [torch.randperm(2 * n + 1, generator=gen)[:n].sort().values if dropped else torch.arange(n)
              for n in lengths]
    positions = torch.cat(frames).to(device)
    num_positions = 2 * max(lengths) + 1 if dropped else max(max(lengths), 1)
    buckets = relative_position_buckets(num_positions, BIAS_BUCKETS, BIAS_MAX_DISTANCE, device=device)
    table = randn(gen, BIAS_BUCKETS, heads, dtype=dtype, device=device)
    gate = (1 + 2 * torch.rand(rows, heads, generator=gen, dtype=torch.float64)).to(dtype).to(device)  # WavLM's (1, 3)
    cu = cu_seqlens_of(lengths, device)
    return q, k, v, cu, max(lengths), 1.0 / math.sqrt(head_dim), table, buckets, gate, positions


def reference_bias_grads(args, grad_out):
    """float64 reference gradients, in the order of the backward op's outputs (q, k, v, gate, table)."""
    q, k, v, cu, _, scale, table, buckets, gate, positions = args
    grads = reference_grads(
        lambda q, k, v, table, gate: reference_varlen_attention(q, k, v, cu.cpu(), scale, table, buckets.cpu(), gate,
                                                                positions.cpu()),
        float64_leaves(q, k, v, table, gate), grad_out.detach().cpu().double())
    return grads[:3] + [grads[4], grads[3]]


def reference_biased_logsumexp(args):
    q, k, v, cu, _, scale, table, buckets, gate, positions = args
    lse = torch.empty(q.shape[:2], dtype=torch.float64)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            scores = torch.einsum("thd,shd->hts", q[start:end].double(), k[start:end].double()) * scale
            bias = materialized_position_bias(table.double(), buckets, positions[start:end])
            scores = scores + gate[start:end].double().t()[:, :, None] * bias
            lse[start:end] = scores.logsumexp(-1).T
    return lse


@pytest.mark.parametrize("num_buckets,max_distance", [(320, 800), (32, 128)], ids=["transformers-defaults",
                                                                                   "torchaudio-defaults"])
def test_relative_position_buckets_match_transformers_and_torchaudio(num_buckets, max_distance):
    from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    num_positions = 3000
    relative = torch.arange(1 - num_positions, num_positions)
    ours = relative_position_buckets(num_positions, num_buckets, max_distance)
    hf = WavLMAttention(8, 2, num_buckets=num_buckets, max_distance=max_distance)._relative_positions_bucket(relative)
    ta = WavLMSelfAttention(8, 2, has_relative_attention_bias=True, num_buckets=num_buckets,
                            max_distance=max_distance)._relative_positions_bucket(relative, bidirectional=True)
    assert ours.dtype == torch.int64 and ours.shape == (2 * num_positions - 1,)
    assert torch.equal(ours, hf), "transformers"
    assert torch.equal(ours, ta), "torchaudio"
    assert int(ours.min()) >= 0 and int(ours.max()) < num_buckets


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: relative_position_buckets(0), "num_positions", id="no-positions"),
    pytest.param(lambda: relative_position_buckets(5, num_buckets=3), "num_buckets", id="too-few-buckets"),
    pytest.param(lambda: relative_position_buckets(5, 32, max_distance=8), "max_distance", id="max-distance-too-small"),
])
def test_relative_position_buckets_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_matches_transformers_wavlm_attention():
    """The public function with the bias, given the gate transformers computes from the layer
    input, reproduces ``WavLMAttention`` (eval, no padding) around it: the same relative distance
    sign, the same per-(row, head) gate and the same scale."""
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    torch.manual_seed(0)
    batch, frames, embed, heads = 2, 23, 16, 2
    layer = WavLMAttention(embed, heads, num_buckets=32, max_distance=20).eval()
    with torch.no_grad():
        layer.gru_rel_pos_const.uniform_(0.5, 1.5)  # not its all-ones init, so a mix-up would show
    hidden = torch.randn(batch, frames, embed)
    with torch.no_grad():
        expected = layer(hidden)[0]
        rows = hidden.reshape(batch * frames, embed)
        q, k, v = (proj(rows).view(-1, heads, embed // heads) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        # transformers' gate, per (row, head): [B, H, T, 1] -> [N, H]
        proj = layer.gru_rel_pos_linear(hidden.view(batch, frames, heads, -1).permute(0, 2, 1, 3))
        gate_a, gate_b = torch.sigmoid(proj.view(batch, heads, frames, 2, 4).sum(-1)).chunk(2, dim=-1)
        gate = (gate_a * (gate_b * layer.gru_rel_pos_const - 1.0) + 2.0).squeeze(-1).permute(0, 2, 1)
        cu = cu_seqlens_of([frames] * batch, "cpu")
        bias = dict(bias_table=layer.rel_attn_embed.weight, bias_buckets=relative_position_buckets(frames, 32, 20),
                    bias_gate=gate.reshape(-1, heads), positions=torch.arange(frames).repeat(batch))
        for backend in ("native", "reference"):
            with dynenc.use_backend(backend):
                out = dynenc.ops.varlen_attention(q, k, v, cu, frames, **bias)
            got = layer.out_proj(out.reshape(batch, frames, embed))
            assert_close(f"{backend} output", expected, got, 1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CPP_BIAS_CASES.values(), ids=CPP_BIAS_CASES.keys())
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_cpp_biased_attention(dtype, case):
    args = bias_inputs(case, dtype)
    out, lse = ops.varlen_attention(*args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q, k, v, cu, max_seqlen, scale, table, buckets, gate, positions = args
    assert_close("out", reference_varlen_attention(q, k, v, cu, scale, table, buckets, gate, positions), out,
                 ATOL[dtype], rtol=ATOL[dtype])
    assert_close("logsumexp", reference_biased_logsumexp(args), lse, 1e-5, rtol=1e-6)
    grad_out = randn(generator(1), *q.shape, dtype=dtype)
    actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, max_seqlen, scale, table, buckets, gate,
                                           positions)
    for name, want, got in zip(BIAS_GRAD_NAMES, reference_bias_grads(args, grad_out), actual, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        # The table gradient sums up to T^2 score gradients per bucket.
        assert_close(name, want, got, ATOL[dtype] * (10 if name == "grad_bias_table" else 1), rtol=ATOL[dtype])


@pytest.mark.parametrize("case", [CPP_BIAS_CASES[c] for c in ("dropped-frames-H3", "long-H3")],
                         ids=["dropped-frames-H3", "long-H3"])
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_cpp_biased_attention_reduced(dtype, case):
    """bf16 / fp16 inputs, fp32 inside: outputs and gradients within their rounding of the float64 result."""
    args = bias_inputs(case, dtype)
    q, k, v, cu, max_seqlen, scale, table, buckets, gate, positions = args
    out, lse = ops.varlen_attention(*args)
    expected = reference_varlen_attention(*(t.double() for t in (q, k, v)), cu, scale, table.double(), buckets,
                                          gate.double(), positions)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert_close("out", expected, out.double(), tolerance, rtol=tolerance)
    grad_out = randn(generator(1), *q.shape, dtype=dtype)
    actual = ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu, max_seqlen, scale, table, buckets, gate,
                                           positions)
    for name, want, got in zip(BIAS_GRAD_NAMES, reference_bias_grads(args, grad_out), actual, strict=True):
        assert got.dtype == dtype, name
        scaled = tolerance * max(1.0, float(want.abs().max()))  # the table gradient is a sum of many terms
        assert_close(name, want, got.double(), scaled, rtol=tolerance)


def test_cpp_biased_attention_reads_packed_projection_views():
    args = bias_inputs(CPP_BIAS_CASES["long-H3"], torch.float32)
    views = packed_projection(*args[:3])
    assert not views[0].is_contiguous()
    out, lse = ops.varlen_attention(*args)
    packed_out, packed_lse = ops.varlen_attention(*views, *args[3:])
    assert_close("out", out, packed_out, 1e-6)
    assert_close("logsumexp", lse, packed_lse, 1e-6)


def test_cpp_biased_attention_allocates_no_score_sized_tensor():
    """Forward + backward at T = 1024, H = 4 allocate nothing of H * T * T floats (16 MiB): no
    [H, T, T] bias or scores exist. Every allocation is seen, short-lived ones too (the
    profiler's allocator events, not the net memory of an op); the reference, which does
    materialise them, shows the check would notice."""
    frames, heads = 1024, 4
    gen = generator(2)
    q, k, v = (randn(gen, frames, heads, 16) for _ in range(3))
    positions = torch.randperm(frames + 200, generator=gen)[:frames].sort().values
    bias = (randn(gen, 320, heads), relative_position_buckets(frames + 200), 1 + torch.rand(frames, heads), positions)
    cu = cu_seqlens_of([frames], "cpu")
    limit = heads * frames * frames * 4

    def largest_allocation(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")

    def native():
        out, lse = ops.varlen_attention(q, k, v, cu, frames, 0.25, *bias)
        ops.varlen_attention_backward(torch.ones_like(q), q, k, v, out, lse, cu, frames, 0.25, *bias)

    largest = largest_allocation(native)
    assert frames * heads * 16 * 4 <= largest < limit / 8, f"largest allocation {largest:,} B"
    assert largest_allocation(lambda: reference_varlen_attention(q, k, v, cu, 0.25, *bias)) >= limit


@pytest.mark.parametrize("case", list(BIAS_CASES.values())[:4], ids=list(BIAS_CASES)[:4])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_biased_attention(dtype, case):
    args = bias_inputs(case, dtype, device=DEVICE)
    out, lse = launcher("varlen_attention")(*args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q, k, v, cu, max_seqlen, scale, table, buckets, gate, positions = args
    q64, k64, v64, table64, gate64 = float64_leaves(q, k, v, table, gate)
    expected = reference_varlen_attention(q64, k64, v64, cu.cpu(), scale, table64, buckets.cpu(), gate64,
                                          positions.cpu())
    assert_close_float64("out", expected, out, TOLERANCES[dtype])
    cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    assert_close_float64("logsumexp", reference_biased_logsumexp(cpu_args), lse, TOLERANCES[torch.float32])
    grad_out = randn(generator(1), *q.shape, dtype=dtype, device=DEVICE)
    grads = launcher("varlen_attention_backward")(grad_out, q, k, v, out, lse, cu, max_seqlen, scale, table, buckets,
                                                  gate, positions)
    for name, want, got in zip(BIAS_GRAD_NAMES, reference_bias_grads(args, grad_out), grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        tolerance = dict(TOLERANCES[dtype])
        if name == "grad_bias_table":  # sums up to T^2 score gradients per bucket
            tolerance["atol"] *= max(1.0, float(want.abs().max()))
        assert_close_float64(name, want, got, tolerance)


def biased_autograd_sample():
    """float64, every differentiable input requiring grad (the positional op arguments)."""
    args = list(bias_inputs(BIAS_CASES["dropped-frames-H3"], torch.float64, seed=4))
    for i in (0, 1, 2, 6, 8):
        args[i].requires_grad_()
    return args


def test_biased_opcheck():
    torch.library.opcheck(ops.varlen_attention.default, biased_autograd_sample())


def test_biased_backward_opcheck():
    args = bias_inputs(BIAS_CASES["dropped-frames-H3"], torch.float64, seed=4)
    out, lse = ops.varlen_attention(*args)
    q, k, v, cu, max_seqlen, scale, *bias = args
    torch.library.opcheck(ops.varlen_attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, cu, max_seqlen, scale, *bias))


def test_biased_gradcheck_through_registered_autograd():
    assert torch.autograd.gradcheck(lambda *a: ops.varlen_attention(*a)[0], biased_autograd_sample(), atol=1e-6)


def test_biased_public_function_matches_reference_backend():
    """``dynenc.ops.varlen_attention(..., bias_*=...)``: native (C++ forward and backward op) and
    reference backends give the same output and gradients, by argument name."""
    q, k, v, cu, max_seqlen, scale, table, buckets, gate, positions = biased_autograd_sample()
    results = {}
    for backend in ("native", "reference"):
        with dynenc.use_backend(backend):
            out = dynenc.ops.varlen_attention(q, k, v, cu, max_seqlen, scale, bias_table=table, bias_buckets=buckets,
                                              bias_gate=gate, positions=positions)
        grads = torch.autograd.grad(out, (q, k, v, table, gate), torch.ones_like(out))
        results[backend] = (out, *grads)
    for name, want, got in zip(("out", "q", "k", "v", "bias_table", "bias_gate"), results["reference"],
                               results["native"], strict=True):
        assert_close(name, want, got, 1e-10, rtol=1e-10)


def test_biased_double_backward_is_refused():
    q, k, v, cu, max_seqlen, scale, table, buckets, gate, positions = biased_autograd_sample()
    out = dynenc.ops.varlen_attention(q, k, v, cu, max_seqlen, scale, bias_table=table, bias_buckets=buckets,
                                      bias_gate=gate, positions=positions)
    (grad_gate,) = torch.autograd.grad(out.sum(), (gate,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad_gate.sum(), (q,), allow_unused=True)


def test_unbiased_backward_returns_empty_bias_grads_and_none_through_autograd():
    q, k, v, cu, max_seqlen, scale, *_ = bias_inputs(BIAS_CASES["ragged-H2"], torch.float32)
    out, lse = ops.varlen_attention(q, k, v, cu, max_seqlen, scale)
    grads = ops.varlen_attention_backward(torch.ones_like(q), q, k, v, out, lse, cu, max_seqlen, scale)
    assert len(grads) == 5 and grads[3].shape == grads[4].shape == (0, q.shape[1])


@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_biased_cpu_autocast(backend_name):
    """bf16 autocast: q/k/v, the table and the gate run in bf16 (the "lower" policy), the output
    is bf16 and close to fp32, and the fp32 table / gate get fp32 gradients."""
    q, k, v, cu, max_seqlen, scale, table, buckets, gate, positions = bias_inputs(CPP_BIAS_CASES["long-H3"],
                                                                                  torch.float32)
    table.requires_grad_()
    gate.requires_grad_()
    bias = dict(bias_table=table, bias_buckets=buckets, bias_gate=gate, positions=positions)
    with dynenc.use_backend(backend_name):
        expected = dynenc.ops.varlen_attention(q, k, v, cu, max_seqlen, scale, **bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dynenc.ops.varlen_attention(q, k, v, cu, max_seqlen, scale, **bias)
    assert out.dtype == torch.bfloat16
    assert_close("out", expected, out.float(), 3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert table.grad.dtype == gate.grad.dtype == torch.float32
    assert torch.isfinite(table.grad).all() and torch.isfinite(gate.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the registered policy, for direct op calls
        assert ops.varlen_attention(q, k, v, cu, max_seqlen, scale, table, buckets, gate, positions)[0].dtype == \
            torch.bfloat16


# Misuse: the C++ op, the public function on both backends and check_varlen_attention (which the
# CUDA registration runs first; it reads no values) raise, naming the argument.
_BQ, _BK, _BV, _BCU, _BMAX, _BSCALE, _BTABLE, _BBUCKETS, _BGATE, _BPOS = bias_inputs(BIAS_CASES["dropped-frames-H3"],
                                                                                     torch.float32)
BIAS_MISUSE = {
    # (bias overrides, error, message pattern, a value check: not seen by check_varlen_attention)
    "gate-missing": (dict(bias_gate=None), ValueError, r"bias_gate missing", False),
    "table-and-positions-missing": (dict(bias_table=None, positions=None), ValueError,
                                    r"bias_table, positions missing", False),
    "table-heads": (dict(bias_table=_BTABLE[:, :2]), ValueError, r"bias_table", False),
    "table-dtype": (dict(bias_table=_BTABLE.double()), TypeError, r"bias_table", False),
    "table-1d": (dict(bias_table=_BTABLE[:, 0]), ValueError, r"bias_table", False),
    "buckets-even-length": (dict(bias_buckets=_BBUCKETS[:-1]), ValueError, r"bias_buckets", False),
    "buckets-int32": (dict(bias_buckets=_BBUCKETS.int()), TypeError, r"bias_buckets", False),
    "gate-rows": (dict(bias_gate=_BGATE[1:]), ValueError, r"bias_gate", False),
    "gate-dtype": (dict(bias_gate=_BGATE.half()), TypeError, r"bias_gate", False),
    "positions-length": (dict(positions=_BPOS[1:]), ValueError, r"positions", False),
    "positions-float": (dict(positions=_BPOS.float()), TypeError, r"positions", False),
    "position-too-large": (dict(positions=_BPOS.clone().index_fill_(0, torch.tensor([4]), (len(_BBUCKETS) + 1) // 2)),
                           ValueError, r"positions", True),
    "position-negative": (dict(positions=_BPOS.clone().index_fill_(0, torch.tensor([0]), -1)), ValueError,
                          r"positions", True),
    "bucket-out-of-range": (dict(bias_buckets=_BBUCKETS.clone().index_fill_(0, torch.tensor([3]), BIAS_BUCKETS)),
                            ValueError, r"bias_buckets", True),
}


def _bias_misuse_params():
    params = []
    for case, (overrides, error, match, value) in BIAS_MISUSE.items():
        for entry in ("torch.ops", "native", "reference", *(() if value else ("check",))):
            params.append(pytest.param(overrides, error, match, entry, id=f"{case}-{entry}"))
    return params


@pytest.mark.parametrize("overrides,error,match,entry", _bias_misuse_params())
def test_biased_misuse_raises(overrides, error, match, entry):
    bias = dict(zip(("bias_table", "bias_buckets", "bias_gate", "positions"), (_BTABLE, _BBUCKETS, _BGATE, _BPOS)))
    bias.update(overrides)
    args = (_BQ, _BK, _BV, _BCU, _BMAX, _BSCALE)
    with pytest.raises(error, match=match):
        if entry == "torch.ops":
            ops.varlen_attention(*args, *bias.values())
        elif entry == "check":
            check_varlen_attention(*args, *bias.values())
        else:
            with dynenc.use_backend(entry):
                dynenc.ops.varlen_attention(*args, **bias)


def test_biased_value_checks_are_skipped_for_trusted_inputs(monkeypatch):
    """The reference backend checks positions / buckets values (a host sync) unless the caller vouches for them."""
    calls = []
    monkeypatch.setattr(attention_module.V, "check_range", lambda ranges: calls.append([r[0] for r in ranges]))
    bias = dict(bias_table=_BTABLE, bias_buckets=_BBUCKETS, bias_gate=_BGATE, positions=_BPOS)
    with dynenc.use_backend("reference"):
        dynenc.ops.varlen_attention(_BQ, _BK, _BV, _BCU, _BMAX, **bias)
        assert calls == [["bias_buckets", "positions"]]
        with validation.trusted_inputs():
            dynenc.ops.varlen_attention(_BQ, _BK, _BV, _BCU, _BMAX, **bias)
    assert len(calls) == 1
