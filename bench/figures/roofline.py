"""``roofline``: how close the encoder is to its irreducible work. For the packed tokens of the
spread-length batch, a full-depth forward must at least run its dense matmuls (per layer: the
two FFNs' 2 linears each, the attention in/out projections, the conv module's two pointwise
convs). The ratio forward / (those same ``F.linear`` calls alone, same shapes and weights,
timed in the same run) is the distance to that limit; the training step likewise against the
matmuls' forward + backward. Measured at the run's config and at D=256 / 12 layers / T=400."""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..harness import Prepared, TrainStep
from ..workload import BenchConfig, Workload, valid_mean_square
from .base import Case, Figure, Ratio, under_inference

LARGE = dict(dim=256, num_heads=4, ffn_dim=1024, num_layers=12)


def large(config: BenchConfig) -> BenchConfig:
    """The issue's second operating point (D=256, 12 layers, T=400), or the run's own config for
    smoke-sized runs (``--quick``)."""
    if config.model.dim < 64:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **LARGE), frames=400)


_WORKLOADS: Dict[str, Workload] = {}


def _workload(config: BenchConfig, device: str) -> Workload:
    """One shared workload per (config, device); ModelConfig is mutable, so keyed by repr."""
    key = f"{config!r}@{device}"
    if key not in _WORKLOADS:
        _WORKLOADS[key] = Workload(config, torch.device(device))
    return _WORKLOADS[key]


def _linears(layer) -> List[tuple]:
    """``(weight [out, in], bias)`` of every dense matmul of one layer, in forward order."""
    conv = layer.conv_module.sequential
    pairs = []
    for ffn in (layer.ffn1, layer.ffn2):
        pairs += [(ffn.sequential[1].weight, ffn.sequential[1].bias), (ffn.sequential[4].weight, ffn.sequential[4].bias)]
    attn = layer.self_attn
    pairs += [(attn.in_proj_weight, attn.in_proj_bias), (attn.out_proj.weight, attn.out_proj.bias)]
    pairs += [(conv[0].weight.squeeze(-1), conv[0].bias), (conv[5].weight.squeeze(-1), conv[5].bias)]
    return pairs


def dense_matmuls(encoder, inputs: Dict[int, Tensor]) -> Tensor:
    """The encoder's dense matmuls alone: each linear on ``inputs[in_features]`` (contiguous
    ``[N, in_features]``, like the real inputs); nothing else is computed."""
    total = next(iter(inputs.values())).new_zeros(())
    for layer in encoder.conformer_layers:
        for weight, bias in _linears(layer):
            total = total + F.linear(inputs[weight.shape[1]], weight, bias)[0, 0]
    return total


def _operating_point(w: Workload):
    """(encoder, input, lengths, {in_features: [N, in_features] matmul inputs})."""
    _, encoder = w.models
    x, lengths = w.input
    num_tokens = int(lengths.sum())
    widths = {weight.shape[1] for layer in encoder.conformer_layers for weight, _ in _linears(layer)}
    return encoder, x, lengths, {d: torch.randn(num_tokens, d, device=x.device) for d in widths}


def _forward(operating_point: str):
    def build(w: Workload) -> Prepared:
        encoder, x, lengths, _ = _operating_point(_point(w, operating_point))
        return Prepared(under_inference(lambda: encoder(x, lengths), encoder))

    return build


def _forward_matmuls(operating_point: str):
    def build(w: Workload) -> Prepared:
        encoder, _, _, inputs = _operating_point(_point(w, operating_point))
        return Prepared(under_inference(lambda: dense_matmuls(encoder, inputs), encoder))

    return build


def _train(operating_point: str):
    def build(w: Workload) -> Prepared:
        encoder, x, lengths, _ = _operating_point(_point(w, operating_point))
        return Prepared(TrainStep(lambda: valid_mean_square(encoder(x, lengths)[0], lengths), [encoder], w.device))

    return build


def _train_matmuls(operating_point: str):
    def build(w: Workload) -> Prepared:
        encoder, _, _, inputs = _operating_point(_point(w, operating_point))
        for tensor in inputs.values():
            tensor.requires_grad_(True)  # the step also computes every input's gradient
        return Prepared(TrainStep(lambda: dense_matmuls(encoder, inputs), [encoder], w.device))

    return build


def _point(w: Workload, operating_point: str) -> Workload:
    return w if operating_point == "bench" else _workload(large(w.config), str(w.device))


def _label(config: BenchConfig, operating_point: str) -> str:
    model = (config if operating_point == "bench" else large(config)).model
    return f"D={model.dim} L={model.num_layers}"


def _points(config: BenchConfig) -> List[str]:
    return ["bench"] if large(config) == config else ["bench", "large"]


def cases(config: BenchConfig) -> List[Case]:
    result = []
    for point in _points(config):
        label = _label(config, point)
        result += [Case("roofline", f"forward {label}", "dynenc", _forward(point)),
                   Case("roofline", f"forward matmuls {label}", "eager", _forward_matmuls(point))]
    label = _label(config, "bench")
    result += [Case("roofline", f"train step {label}", "dynenc", _train("bench")),
               Case("roofline", f"train matmuls {label}", "eager", _train_matmuls("bench"))]
    return result


def ratios(config: BenchConfig) -> List[Ratio]:
    result = []
    for point, target in zip(_points(config), (1.45, 1.30)):
        label = _label(config, point)
        frames = (config if point == "bench" else large(config)).frames
        result.append(Ratio("roofline", f"forward / its matmuls ({label} T={frames})", f"roofline/forward {label}",
                            f"roofline/forward matmuls {label}", target=target))
    label = _label(config, "bench")
    result.append(Ratio("roofline", f"train step / its matmuls fwd+bwd ({label})", f"roofline/train step {label}",
                        f"roofline/train matmuls {label}", target=1.5))
    return result


FIGURE = Figure("roofline", cases, ratios)
