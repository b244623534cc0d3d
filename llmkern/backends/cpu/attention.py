"""The ``cpu`` backend of attention: PyTorch's own fused CPU flash attention (there is no csrc/ kernel).

``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward already are a tiled,
vectorised, multi-threaded FlashAttention for CPUs that returns the log-sum-exp, so this module only
adapts it to the contract of :mod:`llmkern.reference.attention`: grouped K/V heads are repeated
(and their gradients summed), different query/key and value head dims are zero-padded to one
(torch's kernel needs a single head size), float16/bfloat16 inputs are computed in float32 (DESIGN's
numerics: torch's half-precision CPU kernel rounds P before its matmuls and misses the 2x rule on
long rows), a boolean mask becomes an additive one, fully hidden rows get lse = +inf, and outputs
are put in the contract's layouts. Dropout raises :class:`Unsupported`
(torch's kernel has none), so it runs on the reference, whose Philox mask the other backends share.
"""
from __future__ import annotations

import torch

from llmkern.backends import Unsupported

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """Undo an expand: size 1 along every zero-stride dim, so converting the mask costs its real size."""
    index = tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())
    return mask[index]


def _additive(mask, dtype):
    if mask is None:
        return None
    mask = _compact(mask)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _hidden_rows(mask, is_causal, lq, lk):
    """Bool (b|1, h|1, Lq) of rows whose keys are all hidden (only a mask can hide a whole row)."""
    mask = _compact(mask)
    visible = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    if is_causal:
        visible = visible & torch.ones(lq, lk, dtype=torch.bool).tril()
    return ~visible.any(-1)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _sum_groups(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, h_kv, lk, e = like.shape
    if g.shape[1] != h_kv:
        g = g.view(b, h_kv, g.shape[1] // h_kv, lk, e).sum(2)
    return torch.empty_like(like).copy_(g)


def _contract_layout(out: torch.Tensor) -> torch.Tensor:
    """``out`` in the contract's (B, Lq, H, Ev) memory layout: itself when torch's kernel already wrote it so."""
    b, h, lq, ev = out.shape
    if out.stride() == (lq * h * ev, ev, h * ev, 1):
        return out
    return out.new_empty(b, lq, h, ev).transpose(1, 2).copy_(out)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad(t: torch.Tensor, d: int) -> torch.Tensor:
    """Last-dim-contiguous, in the compute dtype, zero-padded to head dim d."""
    t = _lastdim_contiguous(t).to(_compute_dtype(t.dtype))
    return t if t.shape[-1] == d else torch.nn.functional.pad(t, (0, d - t.shape[-1]))


def _prepare(q, k, v):
    """q, k, v in the compute dtype with H heads and one head dim max(E, Ev)."""
    h, d = q.shape[1], max(q.shape[-1], v.shape[-1])
    return tuple(_pad(_repeat_kv(t, h), d) for t in (q, k, v))


def _check(dropout_p):
    if dropout_p > 0.0:
        raise Unsupported("torch's CPU flash attention has no dropout")


def attention_fwd(q, k, v, mask, dropout_p: float, is_causal: bool, scale: float, seed: int):
    _check(dropout_p)
    lq, lk, ev = q.shape[2], k.shape[2], v.shape[-1]
    ct = _compute_dtype(q.dtype)
    out, lse = _FWD(*_prepare(q, k, v), 0.0, is_causal, attn_mask=_additive(mask, ct), scale=scale)
    if mask is not None:
        lse = lse.masked_fill(_hidden_rows(mask, is_causal, lq, lk), float("inf"))
    return _contract_layout(out[..., :ev].to(q.dtype)), lse


def attention_bwd(dout, q, k, v, out, lse, mask, dropout_p: float, is_causal: bool, scale: float, seed: int):
    _check(dropout_p)
    e, ev = q.shape[-1], v.shape[-1]
    ct = _compute_dtype(q.dtype)
    qp, kp, vp = _prepare(q, k, v)
    d = qp.shape[-1]
    dq, dk, dv = _BWD(_pad(dout, d), qp, kp, vp, _pad(out, d), lse.to(ct), 0.0, is_causal,
                      attn_mask=_additive(mask, ct), scale=scale)
    return torch.empty_like(q).copy_(dq[..., :e]), _sum_groups(dk[..., :e], k), _sum_groups(dv[..., :ev], v)
