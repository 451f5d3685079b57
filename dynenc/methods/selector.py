"""Input-conditioned layer selection: a light network reads the encoder's input features
(after the front-end), pools over valid frames and scores every layer."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..routing import valid_frames


class LayerSelector(nn.Module):
    """``[B, T, D]`` inputs + lengths -> ``[B, L]`` layer logits.

    Pooling (*choice*): mean and standard deviation over valid frames, then a 2-layer MLP.
    """

    def __init__(self, dim: int, num_layers: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, num_layers))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        valid = valid_frames(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)
        count = valid.sum(1).clamp_min(1)
        mean = (x * valid).sum(1) / count
        var = (((x - mean.unsqueeze(1)) ** 2) * valid).sum(1) / count
        return self.mlp(torch.cat([mean, var.clamp_min(1e-6).sqrt()], dim=-1))


def topk_mask(logits: Tensor, k: Union[int, Tensor]) -> Tensor:
    """bool ``[B, L]``: the ``k`` highest-scoring layers per sample (k int or int ``[B]``)."""
    num_layers = logits.shape[1]
    k = torch.as_tensor(k, device=logits.device).expand(logits.shape[0])
    if ((k < 0) | (k > num_layers)).any():
        raise ValueError(f"k must lie in [0, {num_layers}], got {k.tolist()}")
    rank = logits.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each layer
    return rank < k[:, None]


def threshold_mask(logits: Tensor, threshold: float) -> Tensor:
    """bool ``[B, L]``: layers whose selection probability ``sigmoid(logit)`` exceeds ``threshold``."""
    return torch.sigmoid(logits) > threshold


def straight_through_topk(logits: Tensor, k: Union[int, Tensor], temperature: float = 1.0,
                          generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Training-time selection (*choice*): Gumbel-perturbed top-k, straight-through gates.

    Returns ``(mask bool [B, L], gates [B, L])``: the hard top-k of ``logits + Gumbel``
    drives the ragged execution; ``gates = hard + s - s.detach()`` with
    ``s = sigmoid((logits + Gumbel) / temperature)`` equals 1 on the selected layers in the
    forward and passes gradients to the selector through every executed layer.
    """
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator).clamp(1e-9, 1 - 1e-9)
    scores = logits - torch.log(-torch.log(uniform))
    mask = topk_mask(scores.detach(), k)
    soft = torch.sigmoid(scores / temperature)
    return mask, mask.to(soft.dtype) + soft - soft.detach()


def budget_regulariser(logits: Tensor, k: Union[int, Tensor]) -> Tensor:
    """Squared gap between the expected number of selected layers and the budget k."""
    k = torch.as_tensor(k, device=logits.device, dtype=logits.dtype)
    return ((torch.sigmoid(logits).sum(1) - k) ** 2).mean()
