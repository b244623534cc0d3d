"""int8 block quantization kernels (absmax / zero-point): the contract of :mod:`llmkern.reference.quant`.

Each program holds ROWS blocks as a (ROWS, BLOCKSIZE) tile. Divisions use ``tl.div_rn`` and
rounding is half-to-even by :func:`_rint`, so the bytes equal the reference's on GPUs and in the
interpreter alike (no libdevice).
"""
from __future__ import annotations

import triton
import triton.language as tl

from llmkern.kernels._convert import bf16_bits


@triton.jit
def _rint(v):
    """Round half to even, for |v| < 2**22."""
    t = tl.floor(v)
    d = v - t
    odd = (t - 2.0 * tl.floor(t * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), t + 1.0, t)


@triton.jit
def int8_quantize_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, n, SYMMETRIC: tl.constexpr,
                         BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    """Blocks [pid * ROWS, pid * ROWS + ROWS) of x (n,): q, scale and (zero-point) zero per block."""
    block0 = tl.program_id(0).to(tl.int64) * ROWS
    start = block0 * BLOCKSIZE
    rows = tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    ok = offs < n - start
    x = tl.load(x_ptr + start + offs, mask=ok, other=0.0).to(tl.float32)
    row_ok = rows < tl.cdiv(n, BLOCKSIZE) - block0
    if SYMMETRIC:
        amax = tl.max(tl.abs(x), axis=1)
        inv = tl.where(amax == 0.0, 0.0, tl.div_rn(tl.full((ROWS,), 127.0, tl.float32), tl.where(amax == 0.0, 1.0, amax)))
        q = tl.minimum(tl.maximum(_rint(x * inv[:, None]), -127.0), 127.0)
        tl.store(q_ptr + start + offs, q.to(tl.int8), mask=ok)
        tl.store(scale_ptr + block0 + rows, tl.div_rn(amax, tl.full((ROWS,), 127.0, tl.float32)), mask=row_ok)
    else:
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
        span = hi - lo
        inv = tl.where(span == 0.0, 0.0, tl.div_rn(tl.full((ROWS,), 255.0, tl.float32), tl.where(span == 0.0, 1.0, span)))
        zero = tl.minimum(tl.maximum(_rint(-lo * inv), 0.0), 255.0)
        q = tl.minimum(tl.maximum(_rint(x * inv[:, None]) + zero[:, None], 0.0), 255.0)
        tl.store(q_ptr + start + offs, q.to(tl.uint8), mask=ok)
        tl.store(scale_ptr + block0 + rows, tl.div_rn(span, tl.full((ROWS,), 255.0, tl.float32)), mask=row_ok)
        tl.store(zero_ptr + block0 + rows, zero.to(tl.uint8), mask=row_ok)


@triton.jit
def int8_dequantize_kernel(q_ptr, scale_ptr, zero_ptr, out_ptr, n, SYMMETRIC: tl.constexpr,
                           BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, OUT_BF16: tl.constexpr):
    """(n,) output; bf16 output is written as int16 bits through a view (see ``bf16_bits``)."""
    block0 = tl.program_id(0).to(tl.int64) * ROWS
    start = block0 * BLOCKSIZE
    rows = tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    ok = offs < n - start
    row_ok = rows < tl.cdiv(n, BLOCKSIZE) - block0
    q = tl.load(q_ptr + start + offs, mask=ok, other=0).to(tl.float32)
    if not SYMMETRIC:
        q = q - tl.load(zero_ptr + block0 + rows, mask=row_ok, other=0).to(tl.float32)[:, None]
    scale = tl.load(scale_ptr + block0 + rows, mask=row_ok, other=0.0)
    value = q * scale[:, None]
    if OUT_BF16:
        tl.store(out_ptr + start + offs, bf16_bits(value), mask=ok)
    else:
        tl.store(out_ptr + start + offs, value.to(out_ptr.dtype.element_ty), mask=ok)
