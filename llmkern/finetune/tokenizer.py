"""Byte-level tokenizer: every UTF-8 byte is a token (so Korean and any schema name encode without
an unknown token), plus three special tokens.

====================  ===========
ids 0..255            the bytes
``PAD`` = 256         padding (never a target)
``BOS`` = 257         start of a sequence
``EOS`` = 258         end of the answer: generation stops here
====================  ===========
"""
from __future__ import annotations

import torch

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
IGNORE_INDEX = -100


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """UTF-8 bytes of ``text`` as ids, optionally with ``BOS`` in front and ``EOS`` at the end."""
    return [BOS] * bos + list(text.encode("utf-8")) + [EOS] * eos


def decode(ids) -> str:
    """Text of ``ids`` (a list or 1-D tensor), stopping at the first ``EOS``; special tokens are
    dropped and invalid UTF-8 (a cut multi-byte character) is replaced by U+FFFD."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    out = bytearray()
    for i in ids:
        if i == EOS:
            break
        if 0 <= i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def encode_pair(prompt: str, answer: str) -> dict[str, list[int]]:
    """A supervised example: ``input_ids`` = BOS + prompt + answer + EOS; ``labels`` the same ids
    with the BOS and prompt positions set to ``IGNORE_INDEX`` (-100), so only the answer and its
    EOS are learned. Labels are aligned with inputs (the model shifts them)."""
    p = encode(prompt, bos=True)
    a = encode(answer, eos=True)
    return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}


def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``encode_pair`` items to ``input_ids``/``labels``/``attention_mask``
    tensors of shape ``(B, max_len)``, int64 (pad id ``PAD``, pad label ``IGNORE_INDEX``, mask 0)."""
    n = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), n), PAD, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, item in enumerate(batch):
        k = len(item["input_ids"])
        ids[i, :k] = torch.tensor(item["input_ids"])
        labels[i, :k] = torch.tensor(item["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
