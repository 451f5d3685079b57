"""Random layer dropping (LD): Bernoulli keep masks drawn with torch's RNG on the device,
and the fixed-n-layers inference strategies."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor


def linear_drop_schedule(num_layers: int, p_max: float) -> Tensor:
    """NeMo-style schedule: layer l (1-based) drops with probability ``p_max * l / L``."""
    return p_max * torch.arange(1, num_layers + 1, dtype=torch.float32) / num_layers


class RandomLayerDrop:
    """Per-sample (default) or per-batch Bernoulli layer gates.

    Args:
        num_layers: L.
        p: drop probability: a scalar, or one per layer (e.g. :func:`linear_drop_schedule`).
        per_sample: one draw per (sample, layer); otherwise one per layer for the whole batch.
    """

    def __init__(self, num_layers: int, p: Union[float, Sequence[float], Tensor] = 0.5, per_sample: bool = True):
        probs = torch.as_tensor(p, dtype=torch.float32).flatten()
        if probs.numel() == 1:
            probs = probs.expand(num_layers)
        if probs.numel() != num_layers:
            raise ValueError(f"p must be a scalar or have {num_layers} entries (one per layer), got {probs.numel()}")
        if ((probs < 0) | (probs > 1)).any():
            raise ValueError(f"p must lie in [0, 1], got {probs.tolist()}")
        self.num_layers = num_layers
        self.drop_prob = probs.clone()
        self.per_sample = per_sample

    def sample(self, batch_size: int, device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
        """bool ``[B, L]`` keep mask (True = the layer runs for that sample)."""
        rows = batch_size if self.per_sample else 1
        uniform = torch.rand(rows, self.num_layers, device=device, generator=generator)
        return (uniform >= self.drop_prob.to(device)).expand(batch_size, -1)


def fixed_layers_mask(num_layers: int, n: int, batch_size: int, strategy: str = "every_other",
                      device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """bool ``[B, L]`` masks running exactly ``n`` layers per sample.

    Strategies: ``"every_other"`` (evenly spaced layers, always including the last one, so
    n = L/2 keeps every other layer), ``"first"`` (layers 1..n) and ``"random"`` (a random
    subset per sample, torch RNG).
    """
    if not 0 <= n <= num_layers:
        raise ValueError(f"n must lie in [0, {num_layers}], got {n}")
    if strategy == "random":
        scores = torch.rand(batch_size, num_layers, device=device, generator=generator)
        chosen = scores.topk(n, dim=1).indices
        return torch.zeros(batch_size, num_layers, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    mask = torch.zeros(num_layers, dtype=torch.bool, device=device)
    if strategy == "every_other":
        # Counting down from the last layer in steps of L / n >= 1 (distinct layers).
        mask[num_layers - 1 - (torch.arange(n) * num_layers) // max(n, 1)] = True
    elif strategy == "first":
        mask[:n] = True
    else:
        raise ValueError(f"strategy must be 'every_other', 'first' or 'random', got {strategy!r}")
    return mask.expand(batch_size, -1)
