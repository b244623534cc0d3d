"""The loss the trainer computes from the model's logits.

Causal LMs follow the Hugging Face convention: labels are aligned with ``input_ids`` and position
``t`` predicts ``labels[t + 1]``. Encoders (``shift=False``, e.g. an llmkern Transformer with
``causal=False``) score position ``t`` on ``labels[t]``. Label -100 is ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern.train.data import IGNORE_INDEX


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: a tensor, a ``(logits, loss)`` tuple, or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"llmkern.train: the model must return logits, a (logits, loss) tuple or an object with "
                    f".logits, got {type(output).__name__}")


def targets_of(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """(B, L) labels -> (B, L) targets: with ``shift`` ``targets[:, t] = labels[:, t + 1]`` and the
    last column -100; without, the labels themselves."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if shift else labels


def count_targets(labels: torch.Tensor, shift: bool = True) -> int:
    """Number of scored tokens of a (B, L) label batch."""
    return int((targets_of(labels, shift) != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Sum over all target tokens of the cross entropy, in fp32.

    Args:
        logits: (B, L, V) any float dtype (upcast to fp32; no copy when already fp32).
        labels: (B, L) int64, -100 = ignored.
        shift: causal LM (position t predicts labels[t + 1]); False scores position t on labels[t].
    Returns: a 0-d fp32 tensor; divide by the global number of targets for the mean.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"llmkern.train: logits must be (B, L, V) with (B, L) = labels.shape {tuple(labels.shape)}, "
                         f"got {tuple(logits.shape)}")
    targets = targets_of(labels, shift)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
