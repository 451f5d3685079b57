"""``DynamicConformerLayer``: one Conformer block with torchaudio's submodules and parameter
names, on packed rows (the encoder's path) or on torchaudio's ``[T, B, D]`` + padding mask;
its feed-forward and convolution modules, and the norms on packed rows."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import ops, validation
from .routing import VarlenBatch, pack, valid_frames


class _FeedForwardModule(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Dropout -> Linear -> Dropout on ``[N, D]`` rows."""

    def __init__(self, input_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.sequential = nn.Sequential(
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, hidden_dim, bias=True),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, input_dim, bias=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # the padded twin's TorchScript path
            return self.sequential(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        return self.after_norm(self.sequential[0](x))

    @torch.jit.unused
    def after_norm(self, h: Tensor) -> Tensor:
        """The module after its LayerNorm, on the normalised rows ``h``."""
        _, linear1, activation, dropout1, linear2, dropout2 = self.sequential
        return dropout2(linear2(dropout1(_activation(activation, linear1(h)))))


def _activation(module: nn.Module, h: Tensor) -> Tensor:
    """``module(h)``; a SiLU on a fresh activation runs in place when autograd needs no copy of
    it (inference), which saves a full-size buffer write per call."""
    if type(module) is nn.SiLU and not (torch.is_grad_enabled() and h.requires_grad) and not torch.jit.is_tracing():
        return F.silu(h, inplace=True)
    return module(h)


def varlen_group_norm(x: Tensor, batch: VarlenBatch, norm: nn.GroupNorm) -> Tensor:
    """``GroupNorm(1, C)`` of each packed sequence alone (statistics over its frames x channels).

    Args:
        x: ``[N, C]``.
    """
    count = (batch.lengths * x.shape[1]).clamp_min(1).to(x.dtype).unsqueeze(1)
    seq_ids = batch.seq_ids
    sums = x.new_zeros(batch.num_seqs, 2).index_add_(0, seq_ids, torch.stack([x.sum(1), (x * x).sum(1)], 1))
    mean = sums[:, :1] / count
    var = (sums[:, 1:] / count - mean * mean).clamp_min(0)
    inv_std = torch.rsqrt(var + norm.eps)
    normed = (x - mean.index_select(0, seq_ids)) * inv_std.index_select(0, seq_ids)
    return normed * norm.weight + norm.bias


def batch_norm_rows(x: Tensor, norm: nn.BatchNorm1d) -> Tensor:
    """BatchNorm1d on ``[N, C]`` rows; statistics over the valid rows in training. In eval
    mode one ATen op (one launch) that, unlike ``F.batch_norm``, does not guard on N > 0,
    which torch.compile cannot decide for a data-dependent N."""
    if norm.training or norm.running_mean is None:
        if guard_or_false(x.shape[0] == 1) and norm.training:
            raise ValueError(
                "BatchNorm1d in training needs more than one active frame in a layer, got one (a layer "
                "that runs on a single one-frame sample); drop that mask, use use_group_norm=True, "
                "or run in eval mode"
            )
        return norm(x)
    return torch.ops.aten._native_batch_norm_legit_no_training(
        x, norm.weight, norm.bias, norm.running_mean, norm.running_var, 0.0, norm.eps
    )[0]


#: What ``_ConvolutionModule.sequential`` holds, for the type checker (to it an ``nn.Sequential``
#: holds plain Modules): pointwise conv, GLU, depthwise conv, norm, activation, pointwise conv, dropout.
_ConvParts = Tuple[
    nn.Conv1d, nn.Module, nn.Conv1d, Union[nn.GroupNorm, nn.BatchNorm1d], nn.Module, nn.Conv1d, nn.Module
]


class _ConvolutionModule(nn.Module):
    """LayerNorm -> pointwise conv (GLU) -> varlen depthwise conv -> Batch/GroupNorm -> SiLU
    -> pointwise conv -> Dropout, on packed ``[N, D]`` rows (parameter names as torchaudio)."""

    def __init__(self, input_dim: int, depthwise_kernel_size: int, dropout: float, use_group_norm: bool) -> None:
        super().__init__()
        if (depthwise_kernel_size - 1) % 2 != 0:
            raise ValueError(f"depthwise_conv_kernel_size must be odd for 'same' padding, got {depthwise_kernel_size}")
        self.layer_norm = nn.LayerNorm(input_dim)
        self.sequential = nn.Sequential(
            nn.Conv1d(input_dim, 2 * input_dim, 1, bias=True),
            nn.GLU(dim=1),
            nn.Conv1d(
                input_dim,
                input_dim,
                depthwise_kernel_size,
                groups=input_dim,
                bias=True,
                padding=(depthwise_kernel_size - 1) // 2,
            ),
            nn.GroupNorm(num_groups=1, num_channels=input_dim) if use_group_norm else nn.BatchNorm1d(input_dim),
            nn.SiLU(),
            nn.Conv1d(input_dim, input_dim, kernel_size=1, bias=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, batch: VarlenBatch) -> Tensor:
        return self.after_norm(self.layer_norm(x), batch)

    def after_norm(self, h: Tensor, batch: VarlenBatch) -> Tensor:
        """The module after its LayerNorm, on the normalised rows ``h``."""
        pointwise1, _, depthwise, norm, activation, pointwise2, dropout = cast(_ConvParts, self.sequential)
        h = F.glu(F.linear(h, pointwise1.weight.squeeze(-1), pointwise1.bias), dim=-1)
        h = ops.varlen_dwconv1d(h, batch.cu_seqlens, depthwise.weight.squeeze(1), depthwise.bias)
        h = varlen_group_norm(h, batch, norm) if isinstance(norm, nn.GroupNorm) else batch_norm_rows(h, norm)
        h = F.linear(_activation(activation, h), pointwise2.weight.squeeze(-1), pointwise2.bias)
        return dropout(h)


def _listened(module: nn.Module) -> bool:
    """Whether calls of ``module`` are observed (its own or global forward hooks)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def _attention_is_plain(attn: nn.Module) -> bool:
    """True when ``attn`` is an ``nn.MultiheadAttention`` (parametrized or not) whose own
    forward would compute exactly what the fused varlen path computes, and nobody listens to
    its calls (no forward hooks): then the fast path may skip calling it."""
    return (
        isinstance(attn, nn.MultiheadAttention)
        and type(attn).forward is nn.MultiheadAttention.forward
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not _listened(attn)
    )


def _plain_layer_norm(norm: nn.Module, x: Tensor, out: Tensor) -> Optional[nn.LayerNorm]:
    """``norm`` when ``ops.add_layer_norm(x, out, alpha, norm.weight, norm.bias, norm.eps)``
    computes what ``x + alpha * out`` followed by ``norm`` computes: an ``nn.LayerNorm``
    (parametrized or not) over x's last dim with its own forward, nobody listening to its
    calls (no forward hooks), and one dtype for the stream, the block output and the affine
    parameters (or autocast, which the op follows); else None (call it as a module)."""
    if not (
        isinstance(norm, nn.LayerNorm)
        and type(norm).forward is nn.LayerNorm.forward
        and tuple(norm.normalized_shape) == (x.shape[-1],)
        and not _listened(norm)
    ):
        return None
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    if all(t.dtype == x.dtype for t in (out, *params)) or torch.is_autocast_enabled(x.device.type):
        return norm
    return None


def _block_norm(block: nn.Module, x: Tensor, out: Tensor) -> Optional[nn.LayerNorm]:
    """The LayerNorm that starts ``block`` (a feed-forward or convolution module of this file,
    or a bare LayerNorm) when the residual add ``x + alpha * out`` before it may compute it
    too (``ops.add_layer_norm``) and the block then run from its normalised input
    (``after_norm``): the block keeps its own forward, nobody listens to its calls and the
    norm is plain (:func:`_plain_layer_norm`). None: call the block as a module."""
    if type(block) is _FeedForwardModule or type(block) is _ConvolutionModule:
        if _listened(block):
            return None
        norm = block.sequential[0] if isinstance(block, _FeedForwardModule) else block.layer_norm
        return _plain_layer_norm(norm, x, out)
    return _plain_layer_norm(block, x, out)


#: A residual block of :meth:`DynamicConformerLayer._forward_packed`: (the module that starts with
#: its LayerNorm, the block on x, the block after its LayerNorm, residual scale).
_Block = Tuple[nn.Module, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], float]


class DynamicConformerLayer(nn.Module):
    """One Conformer block with the submodules of ``torchaudio.models.conformer.ConformerLayer``.

    Two ways to call it:

    * torchaudio's: ``layer(input [T, B, D], key_padding_mask [B, T] or None) -> [T, B, D]``
      (True marks padding; equal, per utterance, to torchaudio's layer; pad positions of the
      output are zero), so layer loops and taps between layers work unchanged;
    * the encoder's packed path: ``layer(rows [M, D], batch: VarlenBatch) -> [M, D]``, the
      active rows of a sub-batch (what forward hooks on a layer see inside ``DynamicConformer``).

    ``self_attn`` is honoured as a module: the fused varlen path reads its weights only when it
    is a plain ``nn.MultiheadAttention`` (``torch.nn.utils.parametrize`` included) without
    forward hooks; a replaced or wrapped attention (LoRA, adapters) or one with hooks is called
    as torchaudio calls it, on a padded ``[T, B, D]`` view of the sub-batch. Attention dropout
    on the probabilities is not applied on the fused path (the varlen attention op has none);
    the output dropouts are.

    Each residual add is fused with the LayerNorm that reads its sum (``ops.add_layer_norm``:
    ``self_attn_layer_norm``, ``conv_module.layer_norm``, ``ffn2.sequential[0]``,
    ``final_layer_norm``) when that norm is a plain ``nn.LayerNorm`` without forward hooks and
    its feed-forward / convolution module is this file's, unhooked; a replaced, subclassed or
    hooked norm (or module) is called as a module instead.
    """

    def __init__(
        self,
        input_dim: int,
        ffn_dim: int,
        num_attention_heads: int,
        depthwise_conv_kernel_size: int,
        dropout: float = 0.0,
        use_group_norm: bool = False,
        convolution_first: bool = False,
    ) -> None:
        super().__init__()
        self.ffn1 = _FeedForwardModule(input_dim, ffn_dim, dropout=dropout)
        self.self_attn_layer_norm = nn.LayerNorm(input_dim)
        self.self_attn = nn.MultiheadAttention(input_dim, num_attention_heads, dropout=dropout)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.conv_module = _ConvolutionModule(input_dim, depthwise_conv_kernel_size, dropout, use_group_norm)
        self.ffn2 = _FeedForwardModule(input_dim, ffn_dim, dropout=dropout)
        self.final_layer_norm = nn.LayerNorm(input_dim)
        self.convolution_first = convolution_first

    def _attention(self, x: Tensor, batch: VarlenBatch) -> Tensor:
        attn = self.self_attn
        if not _attention_is_plain(attn):
            return self._attention_as_module(x, batch)
        num_rows, dim = x.shape
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(num_rows, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.unbind(1)  # views: both backends read the packed rows in place
        out = ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)
        return F.linear(out.reshape(num_rows, dim), attn.out_proj.weight, attn.out_proj.bias)

    def _attention_as_module(self, x: Tensor, batch: VarlenBatch) -> Tensor:
        """``self_attn`` called like torchaudio calls it, on a padded view of the sub-batch."""
        frames, num_seqs, dim = batch.max_seqlen, batch.num_seqs, x.shape[1]
        positions = batch.padded_positions()
        padded = ops.scatter_rows(x, positions, num_seqs * frames).view(num_seqs, frames, dim).transpose(0, 1)
        # An empty sequence keeps one (zero) key so no softmax row is fully masked (NaN); its
        # output is never read back.
        key_padding_mask = ~valid_frames(batch.lengths.clamp_min(1), frames)
        out = self.self_attn(
            query=padded, key=padded, value=padded, key_padding_mask=key_padding_mask, need_weights=False
        )[0]
        return ops.gather_rows(out.transpose(0, 1).reshape(num_seqs * frames, dim), positions)

    def forward(self, input: Tensor, key_padding_mask: Union[Optional[Tensor], VarlenBatch]) -> Tensor:
        """``input [T, B, D]`` + ``key_padding_mask [B, T]`` (True = pad) or None -> ``[T, B, D]``;
        or packed rows ``[M, D]`` + their :class:`VarlenBatch` -> ``[M, D]`` (see the class)."""
        if isinstance(key_padding_mask, VarlenBatch):
            return self._forward_packed(input, key_padding_mask)
        validation.check_tensor("input", input, dim=3, layout="[T, B, D]")
        frames, batch_size, _ = input.shape
        if key_padding_mask is None:
            lengths = torch.full((batch_size,), frames, dtype=torch.int64, device=input.device)
        else:
            validation.check_tensor(
                "key_padding_mask", key_padding_mask, dim=2, layout="[B, T]", dtypes=(torch.bool,), device=input.device
            )
            if tuple(key_padding_mask.shape) != (batch_size, frames):
                raise ValueError(
                    f"key_padding_mask must have shape ({batch_size}, {frames}), got {tuple(key_padding_mask.shape)}"
                )
            lengths = frames - key_padding_mask.sum(1)
            if not torch.equal(key_padding_mask, ~valid_frames(lengths, frames)):
                raise ValueError(
                    "key_padding_mask must mark padding at the end of each sequence (True from its "
                    "length on), as torchaudio's Conformer builds it"
                )
        packed = pack(input.transpose(0, 1), lengths)
        return packed.unpack(self._forward_packed(packed.x, packed.batch)).transpose(0, 1)

    def _attention_block(self, h: Tensor, batch: VarlenBatch) -> Tensor:
        """The attention block after its LayerNorm (``self_attn_layer_norm``)."""
        return self.self_attn_dropout(self._attention(h, batch))

    def _forward_packed(self, x: Tensor, batch: VarlenBatch) -> Tensor:
        # Four residual blocks: (module that starts with the block's LayerNorm, the block on x,
        # the block after its LayerNorm, residual scale). Each residual add is followed by a
        # LayerNorm of its sum (the next block's, finally final_layer_norm); when that norm is
        # plain (_block_norm), both are one op (ops.add_layer_norm) and the next block starts
        # from its output h.
        attn_norm = self.self_attn_layer_norm
        ffn1: _Block = (self.ffn1, self.ffn1, self.ffn1.after_norm, 0.5)
        conv: _Block = (
            self.conv_module,
            lambda x: self.conv_module(x, batch),
            lambda h: self.conv_module.after_norm(h, batch),
            1.0,
        )
        attention: _Block = (
            attn_norm,
            lambda x: self._attention_block(attn_norm(x), batch),
            lambda h: self._attention_block(h, batch),
            1.0,
        )
        ffn2: _Block = (self.ffn2, self.ffn2, self.ffn2.after_norm, 0.5)
        blocks: List[_Block] = (
            [ffn1, conv, attention, ffn2] if self.convolution_first else [ffn1, attention, conv, ffn2]
        )
        h: Optional[Tensor] = None
        for i, (_, block, after_norm, alpha) in enumerate(blocks):
            out = block(x) if h is None else after_norm(h)
            norm = _block_norm(blocks[i + 1][0] if i + 1 < len(blocks) else self.final_layer_norm, x, out)
            if norm is None:
                x, h = torch.add(x, out, alpha=alpha), None
            else:
                x, h = ops.add_layer_norm(x, out, alpha, norm.weight, norm.bias, norm.eps)
        return self.final_layer_norm(x) if h is None else h
