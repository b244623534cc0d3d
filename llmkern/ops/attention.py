"""Scaled dot-product (flash) attention: public API, custom ops, autograd.

The two ``torch.library`` custom ops (their meaning is :mod:`llmkern.reference.attention`)::

    llmkern::attention_fwd(q, k, v, mask?, dropout_p, is_causal, scale, seed?) -> (out, lse)
    llmkern::attention_bwd(dout, q, k, v, out, lse, mask?, dropout_p, is_causal, scale, seed?) -> (dq, dk, dv)

``mask`` is the user's mask expanded (a view, no copy) to ``(B, H, Lq, Lk)``; ``seed`` a 0-d int64
CPU tensor drawn from torch's default generator when ``dropout_p > 0`` (so ``torch.manual_seed``
reproduces the dropout mask, and ``torch.compile`` sees no ``.item()``). ``out`` is laid out as
``(B, Lq, H, Ev)`` transposed to ``(B, H, Lq, Ev)`` (torch's flash layout: ``out.transpose(1, 2)``
reshapes to ``(B, Lq, H * Ev)`` without a copy); dq, dk, dv are laid out as ``torch.empty_like`` of
q, k, v; lse is float32 (float64 for float64 input). Every backend returns these layouts, so the
fake implementations match them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from llmkern.backends import dispatch, register
from llmkern.ops._validate import FLOAT_DTYPES, check_same_device, check_tensor
from llmkern.reference import attention as reference

MAX_HEAD_DIM = 256

register(
    "attention_fwd",
    triton="llmkern.backends.triton.attention:attention_fwd",
    cpu="llmkern.backends.cpu.attention:attention_fwd",
    reference="llmkern.reference.attention:attention_fwd",
)
register(
    "attention_bwd",
    triton="llmkern.backends.triton.attention:attention_bwd",
    cpu="llmkern.backends.cpu.attention:attention_bwd",
    reference="llmkern.reference.attention:attention_bwd",
)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _empty_case(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.numel() == 0 or k.shape[-2] == 0


def _seed(seed: Optional[torch.Tensor]) -> int:
    return 0 if seed is None else int(seed)


@torch.library.custom_op("llmkern::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = reference.attention_fwd if _empty_case(q, k) else dispatch("attention_fwd", q.device)
    return impl(q, k, v, mask, dropout_p, is_causal, scale, _seed(seed))


@_attention_fwd.register_fake
def _(q, k, v, mask, dropout_p, is_causal, scale, seed):
    b, h, lq, _ = q.shape
    return reference.empty_out(q, v.shape[-1]), q.new_empty(b, h, lq, dtype=_lse_dtype(q))


@torch.library.custom_op("llmkern::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = reference.attention_bwd if _empty_case(q, k) else dispatch("attention_bwd", q.device)
    return impl(dout, q, k, v, out, lse, mask, dropout_p, is_causal, scale, _seed(seed))


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(op, query, key, value, attn_mask, dropout_p, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, ndim=4)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"llmkern.{op}: {name} must have query's dtype {query.dtype}, got {t.dtype}")
    check_same_device(op, query=query, key=key, value=value, attn_mask=attn_mask)
    b, h, lq, e = query.shape
    bk, hk, lk, ek = key.shape
    if bk != b or value.shape[0] != b:
        raise ValueError(f"llmkern.{op}: query, key, value must share the batch size, got {b}, {bk}, {value.shape[0]}")
    if tuple(value.shape[1:3]) != (hk, lk):
        raise ValueError(f"llmkern.{op}: value must have key's (heads, length) {(hk, lk)}, got {tuple(value.shape[1:3])}")
    if ek != e:
        raise ValueError(f"llmkern.{op}: key must have query's head dim {e}, got {ek}")
    for name, d in (("query/key", e), ("value", value.shape[-1])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"llmkern.{op}: the {name} head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if hk != h:
        if not enable_gqa:
            raise ValueError(f"llmkern.{op}: key/value have {hk} heads and query {h}; "
                             "pass enable_gqa=True for grouped-query attention")
        if hk == 0 or h % hk != 0:
            raise ValueError(f"llmkern.{op}: query heads ({h}) must be a multiple of key/value heads, got {hk}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"llmkern.{op}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"llmkern.{op}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        full = (b, h, lq, lk)
        shape = tuple(attn_mask.shape)
        if len(shape) > 4 or any(s not in (1, f) for s, f in zip(reversed(shape), reversed(full))):
            raise ValueError(f"llmkern.{op}: attn_mask must be broadcastable to (B, H, Lq, Lk) = {full}, got {shape}")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"llmkern.{op}: attn_mask gets no gradient; pass attn_mask.detach() "
                             "(or compute a differentiable bias with llmkern.reference.attention)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"llmkern.{op}: dropout_p must be in [0, 1), got {dropout_p}")


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Attention ``softmax(scale * Q K^T + mask) V``, as ``torch.nn.functional.scaled_dot_product_attention``.

    query: (B, H, Lq, E); key: (B, H_kv, Lk, E); value: (B, H_kv, Lk, Ev); one dtype among float16,
    bfloat16, float32 (float64 runs on the reference/cpu backends); any strides, e.g. a (B, L, H, E)
    tensor viewed with ``transpose(1, 2)`` is read in place. E and Ev in [1, 256]; Lq, Lk >= 0.

    attn_mask: None, bool (True = the key takes part, like torch) or float (added to the scores;
        -inf hides a key), broadcastable to (B, H, Lq, Lk); streamed, never materialised. It gets no
        gradient. A query row whose keys are all hidden outputs zeros (FlashAttention's convention;
        torch's math path gives NaN) and gets zero gradients.
    is_causal: key j is visible to query i iff j <= i (top-left aligned like torch when Lq != Lk;
        for a KV-cache decode step pass is_causal=False or a mask). May be combined with attn_mask.
    dropout_p: dropout on the attention probabilities, applied whenever > 0 (as torch: the caller
        passes 0 at eval). The keep mask comes from a counter-based Philox generator seeded from
        torch's default CPU generator, so ``torch.manual_seed`` reproduces it; the backward
        regenerates it instead of storing it (:func:`llmkern.reference.attention.dropout_keep`).
    scale: defaults to 1 / sqrt(E).
    enable_gqa: allow H_kv < H (H % H_kv == 0): query head h uses key/value head h // (H // H_kv);
        dK/dV are summed over each group.

    Returns (B, H, Lq, Ev) in query's dtype (memory laid out as (B, Lq, H, Ev)).
    """
    op = "scaled_dot_product_attention"
    _check(op, query, key, value, attn_mask, dropout_p, enable_gqa)
    b, h, lq, e = query.shape
    lk = key.shape[-2]
    mask = None if attn_mask is None else attn_mask.expand(b, h, lq, lk)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    out, _ = _attention_fwd(query, key, value, mask, float(dropout_p), bool(is_causal), scale, seed)
    return out
