"""Reference scaled dot-product attention: the specification of ``llmkern.ops.scaled_dot_product_attention``.

Semantics (same as ``torch.nn.functional.scaled_dot_product_attention`` for 4-D inputs, plus the
choices below, which every backend follows)::

    S = scale * Q @ K^T                         (B, H, Lq, Lk), scale defaults to 1 / sqrt(E)
    S[i, j] = -inf where key j is hidden from query i:
        is_causal: j > i (top-left aligned, like torch, also when Lq != Lk)
        boolean attn_mask: mask[i, j] is False (True = takes part, like torch)
    S += attn_mask                              (additive float mask; -inf entries hide keys)
    P = softmax(S, dim=-1); a row whose keys are all hidden gets P = 0, so its output is 0
        (FlashAttention's convention; torch's math path returns NaN there) and its lse is +inf
    O = (P * Z / (1 - dropout_p)) @ V           Z = dropout keep mask, see :func:`dropout_keep`

Grouped-query attention: K and V have ``H_kv`` heads, ``H % H_kv == 0``, and query head ``h`` reads
key/value head ``h // (H // H_kv)`` (torch's ``enable_gqa`` / ``repeat_interleave`` order).
``is_causal`` and ``attn_mask`` may be given together (both apply); torch forbids that combination.

Backend contract used by :mod:`llmkern.ops.attention` (``mask`` already expanded to
``(B, H, Lq, Lk)``, any strides; ``seed`` an int, unused when ``dropout_p == 0``):

``attention_fwd(q, k, v, mask, dropout_p, is_causal, scale, seed) -> (out, lse)``
    q: (B, H, Lq, E); k: (B, H_kv, Lk, E); v: (B, H_kv, Lk, Ev); out: (B, H, Lq, Ev) in q's dtype,
    laid out as :func:`empty_out` (the contract's layout, so fake tensors match every backend);
    lse: (B, H, Lq) float32 (float64 for float64 input), ``logsumexp(S, -1)`` in natural log,
    +inf for fully hidden rows.
``attention_bwd(dout, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed) -> (dq, dk, dv)``
    gradients in the inputs' dtypes and ``torch.empty_like`` layouts, dk/dv summed over each group of query heads. Recomputes P from
    ``lse`` (any lse works for fully hidden rows: their scores are all -inf, so P = 0).
"""
from __future__ import annotations

import math

import torch

# Philox-4x32-10 constants, as in triton.language.random (so the kernels' tl.rand draws the same numbers).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10  # float32(2**-31), the largest scale with (2**31 - 1) * scale < 1


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for uint32 values held in int64 (split to stay below 2**63)."""
    x = a * (b >> 16)
    y = a * (b & 0xFFFF)
    hi = (x + (y >> 16)) >> 16
    lo = (((x & 0xFFFF) << 16) + y) & _M32
    return hi, lo


def philox(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 of ``triton.language.random``: counters (int64 tensors holding uint32), key (k0, k1)."""
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` in PyTorch: float32 uniforms in [0, 1), bit-identical to Triton's.

    seed: int in [0, 2**63); offsets: int64 tensor of counters (any shape). Counter = (offset low 32
    bits, offset high 32 bits, 0, 0), key = (seed low, seed high); the first output word, read as an
    int32 x, maps to ``(x if x >= 0 else ~x) * 4.6566127342e-10`` in float32.
    """
    offsets = offsets.to(torch.int64)
    zeros = torch.zeros_like(offsets)
    c0, _, _, _ = philox(offsets & _M32, (offsets >> 32) & _M32, zeros, zeros, seed & _M32, (seed >> 32) & _M32)
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=offsets.device)


def dropout_keep(seed: int, shape: tuple[int, int, int, int], dropout_p: float, device) -> torch.Tensor:
    """The dropout keep mask Z, bool ``(B, H, Lq, Lk)``: element (b, h, i, j) is kept iff
    ``uniform(seed, ((b * H + h) * Lq + i) * Lk + j) >= dropout_p`` with the Philox uniform of
    :func:`philox_uniform`. Kernels draw the same numbers, so this reproduces their mask exactly.
    """
    offsets = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    return philox_uniform(seed, offsets) >= torch.tensor(dropout_p, dtype=torch.float32, device=device)


def empty_out(q: torch.Tensor, ev: int) -> torch.Tensor:
    """The contract's output layout for q (B, H, Lq, E): an empty (B, H, Lq, ev) laid out as (B, Lq, H, ev)."""
    b, h, lq, _ = q.shape
    return q.new_empty(b, lq, h, ev).transpose(1, 2)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _sum_groups(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, length, e = t.shape
    return t if h == kv_heads else t.view(b, kv_heads, h // kv_heads, length, e).sum(2)


def _scores(q, k, attn_mask, is_causal, scale):
    """Masked scores ``scale * q @ k^T`` in q's dtype, hidden entries -inf."""
    s = (q @ k.transpose(-1, -2)) * scale
    lq, lk = s.shape[-2:]
    if is_causal:
        visible = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    return s


def _softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax with fully hidden rows mapped to P = 0; returns ``(P, hidden)``, hidden: (..., Lq, 1)."""
    hidden = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(hidden, 0.0), dim=-1)
    return p.masked_fill(hidden, 0.0), hidden


def _dropout_scale(keep, dropout_p, dtype):
    return keep.to(dtype) / (1.0 - dropout_p)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, seed=0, upcast=True):
    """Attention written with plain torch ops (differentiable by autograd), the spec of the op.

    query (B, H, Lq, E), key (B, H_kv, Lk, E), value (B, H_kv, Lk, Ev); attn_mask bool/float broadcastable
    to (B, H, Lq, Lk). Dropout uses :func:`dropout_keep` with ``seed``. ``upcast=True`` computes in fp32
    (fp64 for fp64 input); ``upcast=False`` in the input dtype (torch's own same-dtype computation, the
    baseline of the numerics rule). Returns (B, H, Lq, Ev) in query's dtype.
    """
    b, h, lq, e = query.shape
    lk = key.shape[-2]
    if not enable_gqa and key.shape[1] != h:
        raise ValueError(f"reference attention: key has {key.shape[1]} heads, query {h}; set enable_gqa=True")
    q, k, v = (_upcast(t) for t in (query, key, value)) if upcast else (query, key, value)
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    p, _ = _softmax(_scores(q, k, attn_mask, is_causal, scale))
    if dropout_p > 0.0:
        p = p * _dropout_scale(dropout_keep(seed, (b, h, lq, lk), dropout_p, q.device), dropout_p, p.dtype)
    return (p @ v).to(query.dtype)


def attention_fwd(q, k, v, mask, dropout_p: float, is_causal: bool, scale: float, seed: int):
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    qf, kf, vf = _upcast(q), _repeat_kv(_upcast(k), h), _repeat_kv(_upcast(v), h)
    s = _scores(qf, kf, mask, is_causal, scale)
    p, hidden = _softmax(s)
    lse = torch.logsumexp(s, dim=-1).masked_fill(hidden.squeeze(-1), float("inf"))
    if dropout_p > 0.0:
        p = p * _dropout_scale(dropout_keep(seed, (b, h, lq, lk), dropout_p, q.device), dropout_p, p.dtype)
    return empty_out(q, v.shape[-1]).copy_(p @ vf), lse


def attention_bwd(dout, q, k, v, out, lse, mask, dropout_p: float, is_causal: bool, scale: float, seed: int):
    """Gradients from the recomputed probabilities ``P = exp(S - lse)``, with ``D = rowsum(dO * O)``::

        dV = (P * Z')^T @ dO                    Z' = Z / (1 - dropout_p), or 1 without dropout
        dP = (dO @ V^T) * Z'
        dS = P * (dP - D)                       (D = rowsum(P * dP), which equals rowsum(dO * O))
        dQ = scale * dS @ K,   dK = scale * dS^T @ Q
    """
    b, h, lq, _ = q.shape
    h_kv, lk = k.shape[1], k.shape[-2]
    qf, kf, vf = _upcast(q), _repeat_kv(_upcast(k), h), _repeat_kv(_upcast(v), h)
    do = _upcast(dout)
    p = torch.exp(_scores(qf, kf, mask, is_causal, scale) - lse.to(qf.dtype)[..., None])
    dp = do @ vf.transpose(-1, -2)
    p_drop = p
    if dropout_p > 0.0:
        z = _dropout_scale(dropout_keep(seed, (b, h, lq, lk), dropout_p, q.device), dropout_p, p.dtype)
        p_drop, dp = p * z, dp * z
    delta = (do * _upcast(out)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ kf) * scale
    dk = _sum_groups((ds.transpose(-1, -2) @ qf) * scale, h_kv)
    dv = _sum_groups(p_drop.transpose(-1, -2) @ do, h_kv)
    return tuple(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), (dq, dk, dv)))
