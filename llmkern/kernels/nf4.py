"""NF4 quantization kernels: the contract of :mod:`llmkern.reference.nf4`, byte for byte.

``nf4_quantize_kernel``       x (n,) -> packed nibbles + fp32 absmax; each program holds ROWS blocks as a
                              (ROWS, BLOCKSIZE / 2, 2) tile (element pairs = output bytes).
``dynamic_quantize_kernel``   the 8-bit dynamic-map quantizer of double quantization (65536-entry table).
``nf4_dequantize_kernel``     one pass: nested absmax decode (``code2[q] * absmax2 + offset``, launched with
                              ``enable_fp_fusion=False`` so that the multiply and the add round separately
                              as in bitsandbytes) and nibble decode; bf16 output is rounded to nearest even
                              by integer arithmetic (exact on GPUs and in the interpreter alike).
``nf4_linear_kernel``         y = x @ W.T, W decoded tile by tile in registers (never written densely).
``nf4_linear_dx_kernel``      dx = dy @ W, same decode.

Division uses ``tl.div_rn`` (IEEE rounding; Triton's ``/`` may approximate on GPUs). Each program's
origin is an int64 element index; offsets inside a tile are int32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from llmkern.kernels._convert import bf16_bits


@triton.jit
def _pair_offsets(ROWS: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """(ROWS, BLOCKSIZE // 2, 2) int32 offsets of a tile of ROWS blocks; [r, j, h] is element 2j + h of block r."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    r = tl.arange(0, ROWS)[:, None, None]
    j = tl.arange(0, HALF)[None, :, None]
    h = tl.arange(0, 2)[None, None, :]
    return r * BLOCKSIZE + 2 * j + h


@triton.jit
def nf4_quantize_kernel(x_ptr, bounds_ptr, packed_ptr, absmax_ptr, n,
                        BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    """Blocks [pid * ROWS, pid * ROWS + ROWS) of x. bounds_ptr: the 15 NF4 midpoints (fp32)."""
    block0 = tl.program_id(0).to(tl.int64) * ROWS
    start = block0 * BLOCKSIZE
    offs = _pair_offsets(ROWS, BLOCKSIZE)
    ok = offs < n - start
    x = tl.load(x_ptr + start + offs, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)  # (ROWS,)
    recip = tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.maximum(amax, 1e-38))
    s = x * recip[:, None, None]
    if start + ROWS * BLOCKSIZE > n:
        # The partial last block floors its absmax and divides by it (bitsandbytes' remainder path).
        rows = tl.arange(0, ROWS)
        partial = start + (rows + 1) * BLOCKSIZE > n
        amax = tl.where(partial, tl.maximum(amax, 1e-38), amax)
        s = tl.where(partial[:, None, None], tl.div_rn(x, tl.maximum(amax, 1e-38)[:, None, None]), s)
    code = tl.zeros((ROWS, BLOCKSIZE // 2, 2), tl.int32)
    for j in tl.static_range(15):
        code += (tl.load(bounds_ptr + j) < s).to(tl.int32)
    weight = tl.where(tl.arange(0, 2) == 0, 16, 1)[None, None, :]
    byte = tl.sum(code * weight, axis=2)  # (ROWS, HALF): high nibble = even element; padding (x = 0) -> 7
    pair = tl.arange(0, ROWS)[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + start // 2 + pair, byte.to(tl.uint8), mask=pair < (n - start + 1) // 2)
    rows = tl.arange(0, ROWS)
    tl.store(absmax_ptr + block0 + rows, amax, mask=rows < tl.cdiv(n, BLOCKSIZE) - block0)


@triton.jit
def dynamic_quantize_kernel(a_ptr, lut_ptr, codes_ptr, absmax_ptr, n,
                            BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    """8-bit dynamic-map blockwise quantization of a (n,) fp32 with the 65536-entry lut."""
    block0 = tl.program_id(0).to(tl.int64) * ROWS
    start = block0 * BLOCKSIZE
    rows = tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    ok = offs < n - start
    a = tl.load(a_ptr + start + offs, mask=ok, other=0.0)
    amax = tl.max(tl.abs(a), axis=1)
    inv = tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.where(amax == 0.0, 1.0, amax))
    v = tl.minimum(tl.maximum(a * inv[:, None], -1.0), 1.0)
    index = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(tl.int32)
    code = tl.load(lut_ptr + index, mask=ok, other=0)
    code = tl.where((amax == 0.0)[:, None], 0, code)
    tl.store(codes_ptr + start + offs, code.to(tl.uint8), mask=ok)
    tl.store(absmax_ptr + block0 + rows, amax, mask=rows < tl.cdiv(n, BLOCKSIZE) - block0)


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of ``block`` (int64 tensor): stored, or ``code2[q] * absmax2[block // 256] + offset``."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        a2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return c2 * a2 + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                          out_ptr, n, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr,
                          NESTED_BLOCKSIZE: tl.constexpr, OUT_BF16: tl.constexpr):
    """Blocks [pid * ROWS, pid * ROWS + ROWS) of the (n,) output; bf16 output is written as int16 bits."""
    block0 = tl.program_id(0).to(tl.int64) * ROWS
    start = block0 * BLOCKSIZE
    offs = _pair_offsets(ROWS, BLOCKSIZE)
    ok = offs < n - start
    rows = tl.arange(0, ROWS)
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block0 + rows,
                         rows < tl.cdiv(n, BLOCKSIZE) - block0, NESTED, NESTED_BLOCKSIZE)
    byte = tl.load(packed_ptr + start // 2 + (offs >> 1), mask=ok, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (offs & 1)) * 4)) & 0xF
    value = tl.load(code_ptr + nibble) * scale[:, None, None]
    if OUT_BF16:
        tl.store(out_ptr + start + offs, bf16_bits(value), mask=ok)
    else:
        tl.store(out_ptr + start + offs, value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _weight_tile(packed_ptr, absmax_ptr, code_ptr, row0, col0, N, K, QBLOCK: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 tile W[row0 : row0 + BLOCK_R, col0 : col0 + BLOCK_C] of the NF4 (N, K) weight (0 outside).

    absmax_ptr: fp32 per QBLOCK elements. The int64 element index of W[row0, col0] is split into a
    QBLOCK-aligned origin (even, so byte-aligned) and int32 in-tile offsets.
    """
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    corner = tl.cast(row0, tl.int64) * K + col0
    shift = (corner % QBLOCK).to(tl.int32)
    origin = corner - shift
    idx = rows[:, None] * K + cols[None, :] + shift
    ok = (rows < N - row0)[:, None] & (cols < K - col0)[None, :]
    byte = tl.load(packed_ptr + origin // 2 + (idx >> 1), mask=ok, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (idx & 1)) * 4)) & 0xF
    scale = tl.load(absmax_ptr + origin // QBLOCK + idx // QBLOCK, mask=ok, other=0.0)
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def nf4_linear_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      QBLOCK: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m0:m0+BM, n0:n0+BN] = x @ W.T with fp32 accumulation; x (M, K) rows of stride stride_xm."""
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - m0
    x_ptrs = x_ptr + m0.to(tl.int64) * stride_xm + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_ok[:, None] & (rk < K - k0)[None, :], other=0.0)
        w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, n0, k0, N, K, QBLOCK, BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
    rn = tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + m0.to(tl.int64) * stride_ym + rm[:, None] * stride_ym + (n0 + rn)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (rn < N - n0)[None, :])


@triton.jit
def nf4_linear_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dx_ptr, M, N, K, stride_dym, stride_dxm,
                         QBLOCK: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[m0:m0+BM, k0:k0+BK] = dy @ W with fp32 accumulation; dy (M, N)."""
    m0 = tl.program_id(0) * BLOCK_M
    k0 = tl.program_id(1) * BLOCK_K
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M - m0
    dy_ptrs = dy_ptr + m0.to(tl.int64) * stride_dym + rm[:, None] * stride_dym + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & (rn < N - n0)[None, :], other=0.0)
        w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, n0, k0, N, K, QBLOCK, BLOCK_N, BLOCK_K)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_N
    rk = tl.arange(0, BLOCK_K)
    dx_ptrs = dx_ptr + m0.to(tl.int64) * stride_dxm + rm[:, None] * stride_dxm + (k0 + rk)[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & (rk < K - k0)[None, :])
