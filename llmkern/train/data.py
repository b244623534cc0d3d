"""Data order and batching: a seeded shuffle per epoch, cut into global batches, split into micro-batches.

The order depends only on ``(seed, epoch)``, so the examples of optimizer step ``s`` are the same
whatever ``micro_batch_size``, ``grad_accum_steps`` or the number of processes, as long as their
product (the global batch) is the same; a resumed run recomputes the order from the step number.
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100


class GlobalBatchOrder:
    """The example indices of every optimizer step.

    Epoch ``e`` is ``torch.randperm(num_examples)`` drawn from a generator seeded with
    ``seed * 1_000_003 + e``; step ``s`` of the run takes global batch ``s % steps_per_epoch`` of
    epoch ``s // steps_per_epoch``. The examples left over at the end of an epoch
    (``num_examples % global_batch_size``) are not used in that epoch.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if global_batch_size < 1:
            raise ValueError(f"llmkern.train: global_batch_size must be >= 1, got {global_batch_size}")
        if num_examples < global_batch_size:
            raise ValueError(f"llmkern.train: the training set must hold at least one global batch "
                             f"(micro_batch_size * grad_accum_steps * world_size = {global_batch_size}), "
                             f"got {num_examples} examples")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // global_batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of optimizer step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def global_batch(self, step: int) -> list[int]:
        """The ``global_batch_size`` example indices of optimizer step ``step``."""
        epoch, index = self.position(step)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=generator)
            self._epoch = epoch
        start = index * self.global_batch_size
        return self._perm[start:start + self.global_batch_size].tolist()

    def micro_batches(self, step: int, micro_batch_size: int, grad_accum_steps: int,
                      rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The ``grad_accum_steps`` micro-batches of ``rank`` for step ``step``: micro-batch ``j``
        of rank ``r`` is slice ``j * world_size + r`` of the global batch."""
        expected = micro_batch_size * grad_accum_steps * world_size
        if expected != self.global_batch_size:
            raise ValueError(f"llmkern.train: micro_batch_size * grad_accum_steps * world_size = {expected} "
                             f"does not match the global batch size {self.global_batch_size}")
        batch = self.global_batch(step)
        out = []
        for j in range(grad_accum_steps):
            start = (j * world_size + rank) * micro_batch_size
            out.append(batch[start:start + micro_batch_size])
        return out


def _as_long(value, key: str, i: int) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"llmkern.train.pad_collate: item {i} '{key}' must be a 1-D integer sequence, "
                         f"got dtype {t.dtype} with shape {tuple(t.shape)}")
    return t.long()


def pad_collate(items: Sequence[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack dataset items ``{"input_ids": seq, "labels": seq[, "attention_mask": seq]}`` into a batch.

    Sequences are right-padded to the longest one: ``input_ids`` with ``pad_token_id``, ``labels``
    with -100 (ignored by the loss). Returns ``input_ids`` and ``labels`` (B, L) int64, and
    ``attention_mask`` (B, L) int64 (1 = real token) when some item was padded or an item gave one.
    """
    if not items:
        raise ValueError("llmkern.train.pad_collate: items must not be empty")
    ids, labels, masks = [], [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "input_ids" not in item or "labels" not in item:
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"llmkern.train.pad_collate: item {i} must be a dict with 'input_ids' and 'labels', got {got}")
        x, y = _as_long(item["input_ids"], "input_ids", i), _as_long(item["labels"], "labels", i)
        if x.shape != y.shape:
            raise ValueError(f"llmkern.train.pad_collate: item {i} has {x.numel()} input_ids but {y.numel()} labels")
        ids.append(x)
        labels.append(y)
        masks.append(_as_long(item["attention_mask"], "attention_mask", i) if "attention_mask" in item else None)
    length = max(x.numel() for x in ids)
    padded = any(x.numel() != length for x in ids)
    batch = {
        "input_ids": torch.stack([torch.nn.functional.pad(x, (0, length - x.numel()), value=pad_token_id) for x in ids]),
        "labels": torch.stack([torch.nn.functional.pad(y, (0, length - y.numel()), value=IGNORE_INDEX) for y in labels]),
    }
    if padded or any(m is not None for m in masks):
        batch["attention_mask"] = torch.stack([
            torch.nn.functional.pad(m if m is not None else torch.ones_like(x), (0, length - x.numel()), value=0)
            for x, m in zip(ids, masks)])
    return batch

