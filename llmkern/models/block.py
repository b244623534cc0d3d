"""One pre-norm transformer block, with the residual add fused into the next norm.

A pre-norm block computes ``h = h + attn(norm1(h)); h = h + mlp(norm2(h))``. Written with the fused
``add_*_norm`` ops, each block receives the branch output of the previous one and the residual
stream separately, and adds them inside its first norm (as in flash-attention's ``Block``)::

    residual = hidden + residual;  x = norm1(residual)     # one fused kernel
    hidden = attn(x)
    residual = hidden + residual;  x = norm2(residual)     # one fused kernel
    hidden = mlp(x)
    return hidden, residual                                 # the caller's final norm adds them

The first block gets ``residual=None`` (the embeddings are the residual).
"""
from __future__ import annotations

import torch
from torch import nn

from llmkern import nn as lnn
from llmkern import ops
from llmkern.models.config import TransformerConfig
from llmkern.models.mlp import GeluMLP, SwiGLU
from llmkern.nn.kv_cache import KVCache


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return lnn.RMSNorm(config.dim, eps=config.norm_eps)
    return lnn.LayerNorm(config.dim, eps=config.norm_eps, bias=config.bias)


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)`` in one fused op; ``residual=None`` gives ``(norm(x), x)``."""
    if residual is None:
        return norm(x), x
    if isinstance(norm, torch.nn.RMSNorm):
        return ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)


class Block(nn.Module):
    """Pre-norm block: ``attention_norm``, ``attention`` (:class:`llmkern.nn.Attention`), ``mlp_norm``, ``mlp``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention_norm = make_norm(config)
        self.attention = lnn.Attention(
            config.dim, config.n_heads, config.n_kv_heads, causal=config.causal,
            rope=config.positions == "rope", rope_theta=config.rope_theta, bias=config.bias, dropout=config.dropout)
        self.mlp_norm = make_norm(config)
        mlp = SwiGLU if config.mlp == "swiglu" else GeluMLP
        self.mlp = mlp(config.dim, config.hidden_dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: (B, L, D) -> (hidden, residual), both (B, L, D). Masks as :class:`llmkern.nn.Attention`."""
        x, residual = add_norm(self.attention_norm, hidden, residual)
        hidden = self.dropout(self.attention(x, attn_mask, position_ids, kv_cache))
        x, residual = add_norm(self.mlp_norm, hidden, residual)
        return self.dropout(self.mlp(x)), residual
