"""Routing plans (MegaBlocks style: histogram + cumsum + row list): per-layer active rows and
the ``cu_seqlens`` of each layer's compact sub-batch, from a ``[L, N]`` row mask.

Example::

    >>> row_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)  # 2 layers
    >>> cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)                         # 2 + 3 rows
    >>> indices, offsets, active_cu = dynenc.ops.build_plan(row_mask, cu_seqlens)
    >>> indices[offsets[1]:offsets[2]], active_cu[1]        # layer 1: rows 1, 3, 4; lengths 1, 2
    (tensor([1, 3, 4]), tensor([0, 1, 3], dtype=torch.int32))
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import validation as V
from .registry import dispatch, register_cuda
from .rows import sequence_ids

__all__ = ["build_plan"]


def reference_build_plan(row_mask: Tensor, cu_seqlens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`build_plan` in plain PyTorch."""
    num_layers, num_rows = row_mask.shape
    seq = sequence_ids(cu_seqlens, num_rows)
    counts = torch.zeros(num_layers, cu_seqlens.numel() - 1, dtype=torch.int64, device=row_mask.device)
    counts.index_add_(1, seq, row_mask.long())
    active_cu = F.pad(counts.cumsum(1), (1, 0)).to(torch.int32)
    offsets = F.pad(row_mask.long().sum(1).cumsum(0), (1, 0))
    indices = row_mask.nonzero()[:, 1].contiguous()
    return indices, offsets, active_cu


def check_build_plan(row_mask: Tensor, cu_seqlens: Tensor) -> None:
    V.check_tensor("row_mask", row_mask, dim=2, layout="[layers, rows]", dtypes=(torch.bool,))
    V.check_cu_seqlens(cu_seqlens, row_mask.device)


def check_values_build_plan(row_mask: Tensor, cu_seqlens: Tensor) -> None:
    V.check_cu_seqlens_values(cu_seqlens, row_mask.shape[1])


register_cuda("build_plan", check_build_plan, check_values_build_plan)


@torch.library.register_fake("dynenc::build_plan")
def _(row_mask, cu_seqlens):
    total = torch.library.get_ctx().new_dynamic_size()
    num_layers = row_mask.shape[0]
    return (
        row_mask.new_empty(total, dtype=torch.int64),
        row_mask.new_empty(num_layers + 1, dtype=torch.int64),
        cu_seqlens.new_empty((num_layers, cu_seqlens.shape[0])),
    )


def build_plan(row_mask: Tensor, cu_seqlens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-layer active rows and active-subset ``cu_seqlens`` from a row mask.

    Args:
        row_mask: bool ``[L, N]``; ``row_mask[l, t]`` says packed row t runs layer l.
        cu_seqlens: int32 ``[B + 1]`` of the packed buffer.
    Returns:
        indices: int64 ``[S]``, the active rows of layer 0, then layer 1, ... (ascending
            within a layer), ``S = row_mask.sum()``;
        offsets: int64 ``[L + 1]``; layer l's rows are ``indices[offsets[l]:offsets[l + 1]]``;
        active_cu_seqlens: int32 ``[L, B + 1]``; layer l's compact sub-batch, sequences keep
            their order and inactive ones get length 0.
    """
    check_build_plan(row_mask, cu_seqlens)
    return dispatch("build_plan", reference_build_plan, check_values_build_plan, row_mask, cu_seqlens)
