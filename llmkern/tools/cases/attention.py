"""``llmkern check`` entries for attention: ``scaled_dot_product_attention`` against torch's, fwd and dq/dk/dv."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern import ops
from llmkern.tools.cases import KernelCase

# (B, H, Lq, E) queries against (B, H_kv, Lk, E) keys/values. Standard training shapes first, then
# odd lengths with Lq != Lk, a non-power-of-two head dim, grouped-query and multi-query decode.
SHAPES = (
    {"q": (2, 4, 128, 64), "kv": (2, 4, 128, 64), "causal": True},
    {"q": (1, 4, 17, 80), "kv": (1, 2, 129, 80), "causal": False},
    {"q": (2, 4, 128, 64), "kv": (2, 4, 128, 64), "causal": False},
    {"q": (1, 2, 129, 128), "kv": (1, 2, 300, 128), "causal": True},
    {"q": (2, 8, 1, 64), "kv": (2, 1, 300, 64), "causal": False},
)


def _inputs(dtype, device, *, q, kv, causal):
    return {
        "q": torch.randn(q, dtype=dtype, device=device),
        "k": torch.randn(kv, dtype=dtype, device=device),
        "v": torch.randn(kv, dtype=dtype, device=device),
        "causal": causal,
    }


def _llmkern(q, k, v, causal):
    return ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def _torch(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def cases() -> list[KernelCase]:
    return [KernelCase(op="scaled_dot_product_attention", dispatch="attention_fwd", shapes=SHAPES, inputs=_inputs,
                       llmkern=_llmkern, torch=_torch, grads=("q", "k", "v"), dot=True)]
