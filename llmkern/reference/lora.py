"""Reference LoRA / QLoRA linear layer: the specification of :func:`llmkern.ops.lora_linear`.

Math (PEFT's ``lora.Linear``), with ``x (M, K)``, frozen ``W (N, K)``, ``A (r, K)``, ``B (N, r)``,
``s = scaling`` and ``D`` the LoRA dropout (on the LoRA branch only)::

    xd  = D(x)                    = x * keep / (1 - p)
    xa  = xd A^T                  (M, r), kept in fp32 for the backward
    out = x W^T + bias + s * xa B^T

Backward, with ``g = dY B`` (M, r)::

    dX = dY W + D(s * g A)        (the mask of the forward applies to the LoRA path of dX)
    dA = s * g^T xd               (r, K)
    dB = s * dY^T xa              (N, r)
    W (and the NF4 state) are frozen: no gradient.

Dropout mask, regenerated from ``seed`` instead of being stored: element ``(m, k)`` of the 2-D view
of x is kept when ``u >= p`` with ``u = philox_uniform(seed, m * K + k)``, Triton's ``tl.rand``
(Philox 4x32-10, counter ``(offset_lo, offset_hi, 0, 0)``, key ``(seed_lo, seed_hi)``) reproduced
bit for bit, so every backend draws the same mask.

NF4 weights reach the backend contract as ``(packed, absmax, code, blocksize)``: ``packed`` uint8,
``ceil(N*K/2)`` bytes of W in row-major order, first element in the high nibble (bitsandbytes'
layout); ``absmax`` float32, one decoded (double quantization already undone) scale per block of
``blocksize`` consecutive elements; ``code`` float32 (16,), the NF4 values. ``W[i] = code[nibble(i)]
* absmax[i // blocksize]``. Dense weights pass ``absmax=None`` and ``code=None``.

Backend contract, on 2-D rows:

``lora_fwd(x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed) -> (out, xa)``
    x: (M, K); weight: dense (N, K) in x's dtype, or NF4 as above; lora_A: (r, K); lora_B: (N, r);
    bias: (N,) or None; all floating tensors share x's dtype. out: (M, N) in x's dtype; xa: (M, r)
    float32 (float64 for float64 x), the dropped-out ``xd A^T``.
``lora_bwd(dy, x, weight, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx) -> (dx, dA, dB)``
    dy: (M, N); xa: the forward's. dx: (M, K) in x's dtype (empty when ``need_dx`` is False);
    dA, dB in the dtypes of lora_A, lora_B.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's int32 -> [0, 1) scale
MAX_SEED = 2**31 - 1


def _upcast(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.double() if t.dtype == torch.float64 else t.float()


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a uint32 constant ``a`` and uint32 values ``b`` held in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_lo, t_hi = a_lo * b, a_hi * b  # each < 2**48: no int64 overflow
    return (t_hi + (t_lo >> 16)) >> 16, (t_lo + ((t_hi & 0xFFFF) << 16)) & _M32


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), bit-identical to Triton's ``tl.rand(seed, offsets)`` for int64 offsets."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the int32 bit pattern
    nonneg = torch.where(signed < 0, -signed - 1, signed)
    return nonneg.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_keep(shape: tuple[int, int], p: float, seed: int, device=None) -> torch.Tensor:
    """Bool (M, K) mask of the LoRA dropout: element (m, k) is kept when ``philox_uniform(seed, m*K + k) >= p``."""
    m, k = shape
    offsets = torch.arange(m * k, dtype=torch.int64, device=device).view(m, k)
    return philox_uniform(seed, offsets) >= p


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x * keep / (1 - p)`` on 2-D x, in the upcast dtype (x itself when ``p == 0``, upcast)."""
    xf = _upcast(x)
    if p == 0.0:
        return xf
    return torch.where(dropout_keep(tuple(x.shape), p, seed, x.device), xf / (1.0 - p), torch.zeros_like(xf))


def dequantize_weight(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                      shape: tuple[int, int]) -> torch.Tensor:
    """Dense float32 (N, K) W from the NF4 pieces of the backend contract (see the module docstring)."""
    n = shape[0] * shape[1]
    flat = packed.reshape(-1)
    nibbles = torch.stack(((flat >> 4) & 0xF, flat & 0xF), dim=1).reshape(-1)[:n].long()
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (code.float()[nibbles] * scales).view(shape)


def _dense(weight, absmax, code, blocksize, shape, like: torch.Tensor) -> torch.Tensor:
    if absmax is None:
        return _upcast(weight)
    return dequantize_weight(weight, absmax, code, blocksize, shape).to(_upcast(like).dtype)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``x W^T + bias + scaling * (D(x) A^T) B^T`` for dense W and any leading dims of x, computed in fp32."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    out, _ = lora_fwd(x2, weight, None, None, 0, lora_A, lora_B, bias, scaling, dropout_p, seed)
    return out.view(*x.shape[:-1], lora_B.shape[0])


def lora_fwd(x, weight, absmax, code, blocksize: int, lora_A, lora_B, bias, scaling: float, dropout_p: float,
             seed: int):
    xf = _upcast(x)
    w = _dense(weight, absmax, code, blocksize, (lora_B.shape[0], x.shape[1]), x)
    xa = lora_dropout(x, dropout_p, seed) @ _upcast(lora_A).t()
    out = xf @ w.t() + scaling * (xa @ _upcast(lora_B).t())
    if bias is not None:
        out = out + _upcast(bias)
    return out.to(x.dtype), xa


def lora_bwd(dy, x, weight, absmax, code, blocksize: int, lora_A, lora_B, xa, scaling: float, dropout_p: float,
             seed: int, need_dx: bool):
    dyf, a, b = _upcast(dy), _upcast(lora_A), _upcast(lora_B)
    g = dyf @ b  # (M, r)
    d_a = scaling * (g.t() @ lora_dropout(x, dropout_p, seed))
    d_b = scaling * (dyf.t() @ _upcast(xa))
    if need_dx:
        w = _dense(weight, absmax, code, blocksize, (lora_B.shape[0], x.shape[1]), x)
        dx = (dyf @ w + lora_dropout(scaling * (g @ a), dropout_p, seed)).to(x.dtype)
    else:
        dx = x.new_empty(0)
    return dx, d_a.to(lora_A.dtype), d_b.to(lora_B.dtype)
