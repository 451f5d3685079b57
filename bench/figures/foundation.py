"""``foundation``: speech foundation models on dynenc (:func:`dynenc.from_huggingface`) against
the implementations they are run with today, on one batch of utterances of spread lengths.

Models: a base WavLM and a base HuBERT (Hugging Face's ``WavLMConfig()`` / ``HubertConfig()``
defaults: D=768, 12 layers, 12 heads, FFN 3072), random weights, eval, fp32; tiny configs at
the smoke sizes (``--quick``'s model). Audio: :data:`BATCH` utterances of noise at 16 kHz whose
lengths spread evenly over :data:`FULL_SECONDS` (2-16 s) in a full run and over
:data:`DEFAULT_SECONDS` (0.5-4 s: the same 1:8 spread, so the same padded fraction, at a
quarter of the cost) in the default run.

Cases (``{model} {what}``):

* whole model, waveforms in: HF's own model (eager, the padded batch with ``attention_mask``),
  torchaudio's (``import_huggingface_model`` of the same weights; its batched WavLM runs
  unmasked: torchaudio refuses ``lengths`` for WavLM; HuBERT's gets them, full run only) and
  dynenc at full depth (full run: also at per-sample depths of f = 0.5, front-end included);
* WavLM's transformer layers alone (``dyn.encoder`` on the embedded frames, front-end and
  positional convolution excluded) at per-sample depths of every fraction f
  (:func:`~..workload.depths_for_fraction`: the executed token x layers are f, long and short
  utterances at different depths);
* WavLM's attention step alone, on layer 0's input rows of the batch (real projections of the
  model's weights): dynenc's ``varlen_attention`` with the gated relative-position bias fused
  (the gate computed from the rows, as the layer does), the same op without a bias, and HF's
  materialised bias (its gate, the gated ``[B*H, T, T]`` bias, the key-padding mask merged in,
  then ``F.multi_head_attention_forward``'s ``need_weights=True`` path after its projections,
  as ``WavLMAttention.torch_multi_head_self_attention`` calls it); full run: the same bias into
  SDPA with ``attn_mask``. The bias table lookup that HF does once per forward (``compute_bias``
  + ``repeat``, layer 0) and dynenc's buckets are prepared outside the timing: both are per
  forward, not per layer. Each of these rows carries ``peak_mb``: the most memory the step
  allocates above what was allocated before it (:func:`peak_bytes`).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynenc
from dynenc import ops as native_ops
from dynenc.foundation.features import conv_output_lengths
from dynenc.foundation.layer import bias_gate, projections
from dynenc.routing import pack, valid_frames

from ..harness import Prepared, Work, synchronize
from ..workload import QUICK, BenchConfig, Workload, depths_for_fraction, spread_lengths
from .base import Builder, Case, Figure, Ratio, fraction_label, quiet_loggers, under_inference
from .ops import _ATTENTION_MATH, _attention_flops

SAMPLE_RATE = 16_000
BATCH = 8
FULL_SECONDS = (2.0, 16.0)
DEFAULT_SECONDS = (0.5, 4.0)
QUICK_SECONDS = (0.01, 0.04)
MODELS = ("wavlm", "hubert")
FIGURE_NAME = "foundation"
#: The attention step's implementations: case name suffix -> peer.
ATTENTION = {"dynenc fused bias": "dynenc", "dynenc no bias": "dynenc", "HF materialised bias": "huggingface",
             "HF bias + SDPA": "huggingface"}


# ============================================================================ sizes
def tiny(config: BenchConfig) -> bool:
    """The smoke sizes (``--quick``'s model): tiny foundation models, a few ms of audio."""
    return config.model == QUICK.model


def audio_seconds(config: BenchConfig) -> Tuple[float, float]:
    """Shortest and longest utterance of the batch, in seconds."""
    if tiny(config):
        return QUICK_SECONDS
    return FULL_SECONDS if config.full else DEFAULT_SECONDS


def batch_size(config: BenchConfig) -> int:
    return config.batch if tiny(config) else BATCH


def hf_config(name: str, config: BenchConfig) -> Any:
    """HF's config of ``name`` (``"wavlm"`` / ``"hubert"``): the base defaults, or a tiny one
    at the smoke sizes (the bench model's D, L, heads and FFN; two conv blocks, stride 10)."""
    from transformers import HubertConfig, WavLMConfig

    cls = {"wavlm": WavLMConfig, "hubert": HubertConfig}[name]
    if not tiny(config):
        return cls()
    model = config.model
    relative = dict(num_buckets=16, max_bucket_distance=40) if name == "wavlm" else {}
    return cls(hidden_size=model.dim, num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
               intermediate_size=model.ffn_dim, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, **relative)


# ============================================================================ third-party output
@contextlib.contextmanager
def hf_quiet() -> Iterator[None]:
    """HF's WavLM attention passes a bool key-padding mask with a float bias to
    ``F.multi_head_attention_forward``, which warns (once per process) that mismatched mask
    types are deprecated: expected here, kept out of the bench's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask",
                                category=UserWarning)
        yield


#: What kineto (torch.profiler's backend) prints on stderr around each profile of a CPU-only
#: run: its start / stop notes and, without a GPU, the failed GPU count.
KINETO_NOISE = re.compile(r"^[A-Z]+:\S+ \S+ \d+:\d+ \w+\.cpp:\d+\] "
                          r"(profiler_start|profiler_stop|gpuGetDeviceCount failed)")


@contextlib.contextmanager
def without_kineto_notes() -> Iterator[None]:
    """Inside the block, file descriptor 2 goes to a temporary file; after it, every line of it
    but kineto's notes (:data:`KINETO_NOISE`) is written back to stderr. Kineto writes them from
    C++ (not through Python's logging or warnings) and reads its log level once per process,
    so neither a logger level nor ``KINETO_LOG_LEVEL`` can be set for one profile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not KINETO_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The most bytes ``fn()`` holds allocated at once above what was allocated before it
    (its output included: it is held until the end).

    CUDA: the caching allocator's peak statistics. CPU: every allocation and free of the CPU
    allocator during ``fn()``, in time order, from ``torch.profiler`` with ``profile_memory``
    (intra-op worker threads and C++ ops' own ``at::empty`` buffers included — whatever goes
    through c10's allocator, which is every tensor)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return max(peak, 0)
    from torch.profiler import ProfilerActivity, profile

    with without_kineto_notes(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocations: cannot measure the peak memory")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ============================================================================ models and inputs
class Models:
    """One HF model (random weights), torchaudio's import of it and dynenc's copy, on one device,
    in eval mode: the same weights for every peer."""

    def __init__(self, name: str, config: BenchConfig, device: torch.device) -> None:
        from torchaudio.models.wav2vec2.utils import import_huggingface_model
        from transformers import HubertModel, WavLMModel

        torch.manual_seed(config.seed)
        hf = {"wavlm": WavLMModel, "hubert": HubertModel}[name](hf_config(name, config)).eval()
        # torchaudio notes (a warning) that a base model has no CTC head to import: expected.
        with quiet_loggers("torchaudio.models.wav2vec2.utils.import_huggingface"):
            self.torchaudio = import_huggingface_model(hf).to(device).eval()
        self.hf = hf.to(device)
        self.dynenc = dynenc.from_huggingface(self.hf).eval()


@functools.cache
def _models(w: Workload, name: str) -> Models:
    return Models(name, w.config, w.device)


@functools.cache
def _audio(w: Workload) -> Tuple[Tensor, Tensor, Tensor]:
    """``(waveforms [B, S] (pads zero), attention_mask int64 [B, S], lengths [B])``: noise,
    lengths spread evenly over :func:`audio_seconds` in random order."""
    shortest, longest = audio_seconds(w.config)
    generator = torch.Generator().manual_seed(w.config.seed + 5)
    samples = round(longest * SAMPLE_RATE)
    lengths = spread_lengths(batch_size(w.config), samples, shortest / longest, generator)
    valid = valid_frames(lengths, samples)
    waves = 0.1 * torch.randn(lengths.numel(), samples, generator=generator) * valid
    return waves.to(w.device), valid.long().to(w.device), lengths.to(w.device)


@functools.cache
def _embedded(w: Workload, name: str) -> Tuple[Tensor, Tensor]:
    """``(x [B, T', D], frames [B])``: the transformer's input (after the front-end and the
    positional convolution; HF's ``hidden_states[0]``) and the valid frames."""
    dyn = _models(w, name).dynenc
    waves, mask, _ = _audio(w)
    one = torch.ones(waves.shape[0], dtype=torch.int64, device=w.device)
    with torch.inference_mode():
        out = dyn(waves, attention_mask=mask, output_hidden_states=True, depth=one)
    return out.hidden_states[0], out.lengths


def _padded_fraction(w: Workload, name: str) -> float:
    """Frames a padded model computes over the valid ones (the feature extractor's output
    lengths of the padded and the valid waveforms)."""
    waves, _, lengths = _audio(w)
    conv_layers = _models(w, name).dynenc.feature_extractor.conv_layers
    frames = conv_output_lengths(conv_layers, lengths)
    padded = conv_output_lengths(conv_layers, torch.tensor([waves.shape[1]]))
    return int(padded) * lengths.numel() / int(frames.sum())


@functools.cache
def _depth(w: Workload, name: str, fraction: float) -> Tensor:
    """int64 ``[B]`` per-sample depths executing ``fraction`` of the valid token x layers
    (weighted by tokens and by each utterance's layer cost, attention's included)."""
    encoder = _models(w, name).dynenc.encoder
    frames = _embedded(w, name)[1].cpu()
    cost = torch.tensor([encoder.layer_flops(n, n * n) for n in frames.tolist()])
    generator = torch.Generator().manual_seed(w.config.seed * 1_000_003 + 7 * 1009 + round(fraction * 1000))
    return depths_for_fraction(frames, encoder.num_layers, fraction, generator, cost).to(w.device)


# ============================================================================ whole models, layers
def _name(model: str, what: str) -> str:
    return f"{model} {what}"


def _key(model: str, what: str) -> str:
    return f"{FIGURE_NAME}/{_name(model, what)}"


def _hf(name: str) -> Builder:
    def build(w: Workload) -> Prepared:
        model = _models(w, name).hf
        waves, mask, _ = _audio(w)

        def run() -> Any:
            with hf_quiet():
                return model(waves, attention_mask=mask)

        return Prepared(under_inference(run, model),
                        dict(active=1.0, computed=_padded_fraction(w, name),
                             attn_implementation=str(model.config._attn_implementation)))

    return build


def _torchaudio(name: str) -> Builder:
    def build(w: Workload) -> Prepared:
        model = _models(w, name).torchaudio
        waves, _, lengths = _audio(w)
        masked = name != "wavlm"  # torchaudio's WavLM refuses lengths: batched, it runs unmasked
        args = (waves, lengths) if masked else (waves,)
        return Prepared(under_inference(lambda: model(*args), model),
                        dict(active=1.0, computed=_padded_fraction(w, name), masked=masked, same_weights=True))

    return build


def _dynenc(name: str, fraction: float = 1.0) -> Builder:
    """dynenc's whole model (waveforms in), at full depth or per-sample depths of ``fraction``."""

    def build(w: Workload) -> Prepared:
        model = _models(w, name).dynenc
        waves, mask, _ = _audio(w)
        routing = {} if fraction >= 1 else dict(depth=_depth(w, name, fraction))
        run = under_inference(lambda: model(waves, attention_mask=mask, **routing), model)
        active = 1.0
        if routing:
            out = under_inference(lambda: model(waves, attention_mask=mask, return_report=True, **routing), model)()
            active = out.encoder_output.report.executed_fraction
        return Prepared(run, dict(active=active, computed=active))

    return build


def _layers(name: str, fraction: float) -> Builder:
    """dynenc's transformer layers alone, on the embedded frames, at per-sample depths."""

    def build(w: Workload) -> Prepared:
        encoder = _models(w, name).dynenc.encoder
        x, frames = _embedded(w, name)
        routing = {} if fraction >= 1 else dict(depth=_depth(w, name, fraction))
        run = under_inference(lambda: encoder(x, frames, **routing), encoder)
        report = under_inference(lambda: encoder(x, frames, return_report=True, **routing).report, encoder)()
        full = encoder.num_layers * encoder.layer_flops(int(frames.sum()), float(frames.double().square().sum()))
        return Prepared(run, dict(active=report.executed_fraction, computed=report.executed_fraction,
                                  flops=report.flops / full))

    return build


# ============================================================================ the attention step
@functools.cache
def _attention_inputs(w: Workload) -> Dict[str, Any]:
    """Layer 0's attention of the WavLM batch: its input rows, q / k / v packed ``[N, H, Dh]``
    and in HF's padded layout (``F.multi_head_attention_forward``'s ``[B*H, T, Dh]`` views of
    ``[T, B, D]`` projections), the bias table, buckets, HF's ``[B*H, T, T]`` position bias (as
    layer 0 hands it to the others) and the key-padding mask."""
    models = _models(w, "wavlm")
    dyn_attention, hf_attention = models.dynenc.encoder.layers[0].attention, models.hf.encoder.layers[0].attention
    x, frames = _embedded(w, "wavlm")
    batch, frames_max, dim = x.shape
    heads = dyn_attention.num_heads
    head_dim = dim // heads
    with torch.inference_mode():
        packed = pack(x, frames)
        rows = packed.x
        q, k, v = (F.linear(rows, weight, bias).view(rows.shape[0], heads, head_dim)
                   for weight, bias in projections(dyn_attention)[:3])
        num_buckets, max_distance = models.dynenc.encoder.relative_position
        buckets = native_ops.relative_position_buckets(packed.batch.max_seqlen, num_buckets, max_distance,
                                                       device=w.device)
        padded = [packed.unpack(t.reshape(rows.shape[0], dim)).transpose(0, 1).contiguous()
                  .view(frames_max, batch * heads, head_dim).transpose(0, 1) for t in (q, k, v)]
        position_bias = hf_attention.compute_bias(frames_max, frames_max)
        position_bias = position_bias.unsqueeze(0).repeat(batch, 1, 1, 1).view(batch * heads, frames_max, frames_max)
    return dict(rows=rows, qkv=(q, k, v), batch=packed.batch, buckets=buckets, dyn_attention=dyn_attention,
                hidden=x, padded=padded, position_bias=position_bias, hf_attention=hf_attention,
                key_padding=~valid_frames(frames, frames_max), work=Work(
                    flops=_attention_flops(packed.batch.cu_seqlens, heads, head_dim), math=_ATTENTION_MATH[q.dtype]))


def hf_gated_bias(attention: nn.Module, hidden: Tensor, position_bias: Tensor) -> Tensor:
    """HF ``WavLMAttention.forward``'s gated bias ``[B*H, T, T]`` from ``hidden [B, T, D]``."""
    batch, frames, _ = hidden.shape
    heads = attention.num_heads
    gated = hidden.view(batch, frames, heads, -1).permute(0, 2, 1, 3)
    proj = attention.gru_rel_pos_linear(gated).view(batch, heads, frames, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
    gate = gate_a * (gate_b * attention.gru_rel_pos_const - 1.0) + 2.0
    return (gate.view(batch * heads, -1, 1) * position_bias).view(-1, frames, frames)


def _merged_mask(bias: Tensor, key_padding: Tensor, heads: int) -> Tensor:
    """The bias plus the key-padding mask as ``-inf`` (``F.multi_head_attention_forward``'s
    merge of a bool ``key_padding_mask [B, T]`` into ``attn_mask [B*H, T, T]``)."""
    batch, frames = key_padding.shape
    padding = torch.zeros(key_padding.shape, dtype=bias.dtype, device=bias.device).masked_fill_(key_padding,
                                                                                                  float("-inf"))
    return bias + padding.view(batch, 1, 1, frames).expand(-1, heads, -1, -1).reshape(batch * heads, 1, frames)


def hf_materialised_attention(attention: nn.Module, hidden: Tensor, q: Tensor, k: Tensor, v: Tensor,
                              position_bias: Tensor, key_padding: Tensor) -> Tuple[Tensor, Tensor]:
    """HF's WavLM attention step after its q / k / v projections: the gated bias, the merged
    mask, then ``F.multi_head_attention_forward``'s ``need_weights=True`` path (``baddbmm``,
    softmax, ``bmm``, the output laid out for ``out_proj``, the head-averaged weights HF asks
    for). ``q, k, v [B*H, T, Dh]``. Returns ``(out [T*B, D], weights [B, T, T])``."""
    bh, frames, head_dim = q.shape
    heads = attention.num_heads
    mask = _merged_mask(hf_gated_bias(attention, hidden, position_bias), key_padding, heads)
    weights = torch.softmax(torch.baddbmm(mask, q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1)), dim=-1)
    out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(frames * (bh // heads), heads * head_dim)
    return out, weights.view(bh // heads, heads, frames, frames).mean(dim=1)


def hf_bias_sdpa(attention: nn.Module, hidden: Tensor, q: Tensor, k: Tensor, v: Tensor, position_bias: Tensor,
                 key_padding: Tensor) -> Tensor:
    """The same gated bias and mask into ``F.scaled_dot_product_attention`` (no weights
    returned): the best a padded implementation with a materialised bias can do."""
    bh, frames, head_dim = q.shape
    heads = attention.num_heads
    mask = _merged_mask(hf_gated_bias(attention, hidden, position_bias), key_padding, heads)
    shape = (bh // heads, heads, frames, head_dim)
    return F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                          attn_mask=mask.view(bh // heads, heads, frames, frames))


def _attention(kind: str) -> Builder:
    def build(w: Workload) -> Prepared:
        inputs = _attention_inputs(w)
        q, k, v = inputs["qkv"]
        batch = inputs["batch"]
        if kind == "dynenc fused bias":
            attention, rows = inputs["dyn_attention"], inputs["rows"]
            table = attention.rel_attn_embed.weight

            def call() -> Any:
                return native_ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, bias_table=table,
                                                   bias_buckets=inputs["buckets"],
                                                   bias_gate=bias_gate(attention, rows), positions=batch.positions)
        elif kind == "dynenc no bias":
            def call() -> Any:
                return native_ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)
        else:
            step = hf_materialised_attention if kind == "HF materialised bias" else hf_bias_sdpa
            arguments = (inputs["hf_attention"], inputs["hidden"], *inputs["padded"], inputs["position_bias"],
                         inputs["key_padding"])

            def call() -> Any:
                return step(*arguments)
        run = under_inference(call)
        run()  # first call outside the measurement (lazy initialisation, thread pools)
        peak = under_inference(lambda: peak_bytes(call, w.device))()
        # one [B*H, T, T] fp32 tensor: what a materialised bias costs per copy
        bias_mb = inputs["position_bias"].numel() * q.element_size() / 2**20
        return Prepared(run, dict(peak_mb=peak / 2**20, bias_mb=bias_mb), repeat_inside=True, work=inputs["work"])

    return build


# ============================================================================ cases, ratios
def cases(config: BenchConfig) -> List[Case]:
    """WavLM: HF, torchaudio, dynenc; its layers at every fraction; its attention step three
    ways. HuBERT: HF and dynenc. Full run: HuBERT's torchaudio (masked), WavLM's whole model at
    f = 0.5, the materialised bias into SDPA."""
    figure = FIGURE_NAME
    result = [
        Case(figure, _name("wavlm", "HF eager"), "huggingface", _hf("wavlm")),
        Case(figure, _name("wavlm", "torchaudio unmasked"), "torchaudio", _torchaudio("wavlm")),
        Case(figure, _name("wavlm", "dynenc"), "dynenc", _dynenc("wavlm")),
    ]
    if config.full:
        result.append(Case(figure, _name("wavlm", "dynenc f=0.50"), "dynenc", _dynenc("wavlm", 0.5)))
    result += [Case(figure, _name("wavlm", f"dynenc layers {fraction_label(f)}"), "dynenc", _layers("wavlm", f))
               for f in config.fractions]
    result += [Case(figure, _name("wavlm", f"attention {kind}"), peer, _attention(kind))
               for kind, peer in ATTENTION.items() if config.full or kind != "HF bias + SDPA"]
    result += [Case(figure, _name("hubert", "HF eager"), "huggingface", _hf("hubert")),
               Case(figure, _name("hubert", "dynenc"), "dynenc", _dynenc("hubert"))]
    if config.full:
        result.append(Case(figure, _name("hubert", "torchaudio"), "torchaudio", _torchaudio("hubert")))
    return result


def ratios(config: BenchConfig) -> List[Ratio]:
    full_layers = _key("wavlm", "dynenc layers f=1.00")

    def proportional(key: str) -> Callable[[Dict[str, Dict[str, Any]]], float]:
        return lambda infos: infos[key]["active"] + 0.05  # f = the executed token x layer fraction

    result = [Ratio(FIGURE_NAME, f"{model} dynenc / HF eager", _key(model, "dynenc"), _key(model, "HF eager"),
                    target=0.60, note="whole model, front-end included") for model in MODELS]
    result.append(Ratio(FIGURE_NAME, "wavlm dynenc / torchaudio (unmasked)", _key("wavlm", "dynenc"),
                        _key("wavlm", "torchaudio unmasked"), note="torchaudio's batched WavLM cannot mask pads"))
    if config.full:
        result += [Ratio(FIGURE_NAME, "hubert dynenc / torchaudio", _key("hubert", "dynenc"),
                         _key("hubert", "torchaudio")),
                   Ratio(FIGURE_NAME, "wavlm dynenc f=0.50 / full (whole model)", _key("wavlm", "dynenc f=0.50"),
                         _key("wavlm", "dynenc"), note="front-end included: it does not shrink with f")]
    for f in sorted(config.fractions, reverse=True):
        if f < 1:
            key = _key("wavlm", f"dynenc layers {fraction_label(f)}")
            result.append(Ratio(f"{FIGURE_NAME} depth", f"wavlm layers {fraction_label(f)} / full", key, full_layers,
                                target=proportional(key), note="per-sample depths, transformer layers only"))
    fused, plain = _key("wavlm", "attention dynenc fused bias"), _key("wavlm", "attention dynenc no bias")
    materialised = _key("wavlm", "attention HF materialised bias")
    result += [
        Ratio(f"{FIGURE_NAME} attention", "fused bias / HF materialised bias", fused, materialised, target=1 / 1.5),
        Ratio(f"{FIGURE_NAME} attention", "fused bias / no bias (time)", fused, plain),
        Ratio(f"{FIGURE_NAME} attention", "fused bias peak / no-bias peak", fused, plain, target=1.2, metric="peak"),
        Ratio(f"{FIGURE_NAME} attention", "HF materialised peak / no-bias peak", materialised, plain,
              metric="peak"),
    ]
    if config.full:
        result.append(Ratio(f"{FIGURE_NAME} attention", "fused bias / HF bias + SDPA", fused,
                            _key("wavlm", "attention HF bias + SDPA")))
    return result


def plot(ax, rows) -> None:
    """Median times of the whole-model and layer cases (attention steps: their peak MB)."""
    models = [r for r in rows if "attention" not in r.case]
    attention = [r for r in rows if "attention" in r.case]
    colours = {"huggingface": "C1", "torchaudio": "C3", "dynenc": "C0"}
    shown = models + attention
    ax.barh([r.case for r in shown], [r.median_ms for r in shown], color=[colours.get(r.peer, "C7") for r in shown])
    for i, r in enumerate(shown):
        extra = f"  peak {r.info['peak_mb']:.0f} MB" if "peak_mb" in r.info else ""
        ax.text(r.median_ms, i, f" {r.median_ms:.3g} ms{extra}", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set(title="foundation models: HF / torchaudio vs dynenc (WavLM, HuBERT)", xlabel="ms (log)")
    ax.margins(x=0.35)


FIGURE = Figure(FIGURE_NAME, cases, ratios, per_token=False)
