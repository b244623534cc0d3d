"""``Attention``: multi-head / grouped-query self-attention through :func:`llmkern.ops.scaled_dot_product_attention`."""
from __future__ import annotations

import torch
from torch import nn

from llmkern import ops
from llmkern.nn.kv_cache import KVCache
from llmkern.nn.rotary import RotaryEmbedding


def causal_mask(l_q: int, l_k: int, device: torch.device) -> torch.Tensor:
    """Boolean (L_q, L_k) mask, True = attend: query i (absolute position L_k - L_q + i) sees keys j <= that position.

    Bottom-right aligned, which is what a query block appended after ``L_k - L_q`` cached tokens needs
    (torch's ``is_causal`` is top-left aligned, the same thing only when L_q == L_k).
    """
    return torch.ones(l_q, l_k, dtype=torch.bool, device=device).tril(l_k - l_q)


class Attention(nn.Module):
    """Self-attention: q/k/v projections, optional RoPE, scaled dot-product attention, output projection.

    Args:
        dim: model width D (input and output features).
        n_heads: query heads H. n_kv_heads: key/value heads H_kv (default H); H_kv < H is grouped-query
            attention (H_kv = 1: multi-query), H must be a multiple of H_kv.
        head_dim: E, default D // H.
        causal: each token attends only to itself and earlier tokens (decoder); False: bidirectional.
        rope: rotate queries and keys with :class:`~llmkern.nn.RotaryEmbedding` (base ``rope_theta``).
        bias: bias in the four projections. dropout: attention-probability dropout in training.

    Parameters ``q_proj`` (H*E, D), ``k_proj``/``v_proj`` (H_kv*E, D), ``o_proj`` (D, H*E) are plain
    ``nn.Linear`` modules (Llama's names), so LoRA/QLoRA preparation can replace them.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, head_dim: int | None = None,
                 causal: bool = True, rope: bool = False, rope_theta: float = 10000.0, bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"llmkern.nn.Attention: n_heads must be a positive multiple of n_kv_heads, "
                             f"got n_heads={n_heads}, n_kv_heads={n_kv_heads}")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"llmkern.nn.Attention: dim must be divisible by n_heads when head_dim is not given, "
                                 f"got dim={dim}, n_heads={n_heads}")
            head_dim = dim // n_heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"llmkern.nn.Attention: dropout must be in [0, 1), got {dropout}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal, self.dropout = causal, dropout
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope else None

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty :class:`~llmkern.nn.KVCache` for this layer, for up to ``max_len`` tokens."""
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D).

        attn_mask: optional mask broadcastable to (B, H, L, L_k), boolean (True = attend) or additive
            float, applied *in addition to* the causal rule; L_k = L plus the tokens already cached.
        position_ids: absolute positions for RoPE, (L,) or (B, L); default ``cache length + arange(L)``.
        kv_cache: keys/values of earlier tokens; this call appends its own and attends over all of them.
        """
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, L, E)
        k = self.k_proj(x).view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, L, E)
        v = self.v_proj(x).view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, L, E)
        start = 0 if kv_cache is None else kv_cache.length
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(start, start + l, device=x.device)
            q, k = self.rotary(q, k, position_ids)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)                                               # (B, H_kv, L_k, E)
        l_k = k.shape[2]

        is_causal = self.causal and l > 1
        if is_causal and (attn_mask is not None or l_k != l):
            allowed = causal_mask(l, l_k, x.device)                                    # (L, L_k)
            if attn_mask is None:
                attn_mask = allowed
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & allowed
            else:
                attn_mask = torch.where(allowed, attn_mask, float("-inf"))
            is_causal = False

        out = ops.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads)           # (B, H, L, E)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, causal={self.causal}"
