"""CTC-ready batches: padding features and concatenating targets.

Typical use::

    tok = CharTokenizer()
    for feats, feat_lens, targets, target_lens in SpeechBatches(train, tok, max_frames=20000):
        log_probs = model(feats, feat_lens)             # [T, B, V] for ctc_loss
        loss = F.ctc_loss(log_probs, targets, out_lens, target_lens, blank=tok.blank)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .tokenizer import CharTokenizer, Tokenizer

__all__ = ["collate_batch", "SpeechBatches"]


def collate_batch(
    items: Sequence[tuple[torch.Tensor, str | Sequence[int]]],
    tokenizer: Tokenizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a list of ``(features [T_i, F], text or token ids)`` for CTC training.

    Returns:
        features: float32 ``[B, T_max, F]``, zero-padded after each utterance.
        feature_lengths: int64 ``[B]`` (= ``T_i``).
        targets: int64 ``[sum U_i]``, all transcripts' ids concatenated (the 1-D form
            ``torch.nn.functional.ctc_loss`` accepts).
        target_lengths: int64 ``[B]`` (= ``U_i``).
    """
    if not items:
        raise ValueError("collate_batch needs at least one item")
    tokenizer = tokenizer or CharTokenizer()
    feats = [torch.as_tensor(f, dtype=torch.float32) for f, _ in items]
    dims = {f.shape[1] for f in feats}
    if any(f.dim() != 2 for f in feats) or len(dims) != 1:
        raise ValueError(f"features must all be [T, F] with the same F, got {[tuple(f.shape) for f in feats]}")
    feature_lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    padded = torch.zeros(len(feats), int(feature_lengths.max()), dims.pop(), dtype=torch.float32)
    for b, f in enumerate(feats):
        padded[b, : f.shape[0]] = f
    ids = [tokenizer.encode(t) if isinstance(t, str) else [int(i) for i in t] for _, t in items]
    target_lengths = torch.tensor([len(i) for i in ids], dtype=torch.int64)
    targets = torch.tensor([i for seq in ids for i in seq], dtype=torch.int64)
    return padded, feature_lengths, targets, target_lengths


class SpeechBatches:
    """Iterable of CTC batches (see :func:`collate_batch`) over an in-memory split.

    Args:
        data: ``[(features [T, F], text), ...]`` e.g. from :func:`dynenc.asr.features.load_split`.
        tokenizer: defaults to :class:`CharTokenizer`.
        batch_size: utterances per batch (used when ``max_frames`` is None).
        max_frames: if set, batches are filled up to ``B * T_max <= max_frames``
            padded frames instead of a fixed size (more, shorter utterances per batch).
        shuffle: shuffle with ``torch.Generator`` seeded from ``(seed, epoch)``.
        sort_by_length: bucket utterances of similar length to reduce padding.  With
            ``shuffle``, the data is shuffled, cut into pools of ``pool_batches``
            batches' worth, sorted by length within each pool, and the batch order
            shuffled again, so batches differ between epochs but stay length-homogeneous.
            Without ``shuffle``, a global length sort (deterministic, e.g. for eval).
        drop_last: drop a final fixed-size batch smaller than ``batch_size``.

    Call :meth:`set_epoch` before each epoch to get a new (reproducible) order;
    iterating twice without it yields the same batches.
    """

    def __init__(
        self,
        data: Sequence[tuple[torch.Tensor, str]],
        tokenizer: Tokenizer | None = None,
        batch_size: int = 32,
        max_frames: int | None = None,
        shuffle: bool = True,
        sort_by_length: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pool_batches: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.data = data
        self.tokenizer = tokenizer or CharTokenizer()
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.shuffle = shuffle
        self.sort_by_length = sort_by_length
        self.seed = seed
        self.drop_last = drop_last
        self.pool_batches = pool_batches
        self.epoch = 0
        self._lengths = [int(f.shape[0]) for f, _ in data]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunk(self, order: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        if self.max_frames is None:
            for s in range(0, len(order), self.batch_size):
                batches.append(order[s : s + self.batch_size])
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            return batches
        cur: list[int] = []
        cur_max = 0
        for i in order:
            new_max = max(cur_max, self._lengths[i])
            if cur and new_max * (len(cur) + 1) > self.max_frames:
                batches.append(cur)
                cur, new_max = [], self._lengths[i]
            cur.append(i)
            cur_max = new_max
        if cur:
            batches.append(cur)
        return batches

    def batch_indices(self) -> list[list[int]]:
        """Indices into ``data`` for each batch of the current epoch."""
        n = len(self.data)
        if not self.shuffle:
            order = list(range(n))
            if self.sort_by_length:
                order.sort(key=lambda i: self._lengths[i])
            return self._chunk(order)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen).tolist()
        if not self.sort_by_length:
            return self._chunk(order)
        # Pool size in utterances: with max_frames, estimate utterances per batch.
        if self.max_frames is None:
            per_batch = self.batch_size
        else:
            mean_len = max(1.0, sum(self._lengths) / max(1, n))
            per_batch = max(1, int(self.max_frames / mean_len))
        pool = max(1, per_batch * self.pool_batches)
        batches = []
        for s in range(0, n, pool):
            chunk = sorted(order[s : s + pool], key=lambda i: self._lengths[i])
            batches.extend(self._chunk(chunk))
        perm = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[p] for p in perm]

    def __len__(self) -> int:
        return len(self.batch_indices())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx in self.batch_indices():
            yield collate_batch([self.data[i] for i in idx], self.tokenizer)
