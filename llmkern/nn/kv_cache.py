"""Preallocated key/value cache of one attention layer, for incremental decoding."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the tokens seen so far, in buffers of shape (B, H_kv, max_len, E).

    ``update(k, v)`` appends the new tokens' keys and values (B, H_kv, L, E) and returns views of
    everything cached so far, (B, H_kv, length, E). ``length`` is the number of cached tokens, i.e.
    the absolute position of the next token. The buffers are allocated at the first update, with
    that update's dtype and device. Meant for inference (``torch.no_grad``): they are written in place.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int):
        self.shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, max_len, e = self.shape
        if k.shape[:2] != (b, h) or k.shape[3] != e or v.shape != k.shape:
            raise ValueError(f"llmkern.nn.KVCache: expected keys/values of shape (B={b}, H_kv={h}, L, E={e}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        end = self.length + k.shape[2]
        if end > max_len:
            raise ValueError(f"llmkern.nn.KVCache: {end} tokens do not fit in a cache of max_len {max_len}")
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]
