"""Triton launchers for the nf4 contract of :mod:`llmkern.reference.nf4`. Kernels: :mod:`llmkern.kernels.nf4`.

Quantize / dequantize give the reference's bytes and values exactly (GPU and interpreter).
``nf4_linear`` and its input gradient decode W tile by tile inside the GEMM; a double-quantized
absmax is first decoded to its fp32 form (``nblocks`` floats) by two eager torch ops, which round the
multiply and the add separately as the reference does.
"""
from __future__ import annotations

import torch
import triton

from llmkern.backends import TRITON_INTERPRET, require_dtypes
from llmkern.backends.triton._aot import AotSpec
from llmkern.backends.triton._launch import GPU_TILE_ELEMENTS, TILE_ELEMENTS, device_guard, num_warps_for
from llmkern.kernels.nf4 import (
    dynamic_quantize_kernel, nf4_dequantize_kernel, nf4_linear_dx_kernel, nf4_linear_kernel, nf4_quantize_kernel,
)
from llmkern.reference import nf4 as reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        t = reference.nf4_bounds(device) if name == "bounds" else reference.nf4_code(device)
        _TABLES[key] = t.contiguous()
    return t


def _rows(blocksize: int, nblocks: int, tile: int = TILE_ELEMENTS) -> int:
    """Blocks per program: about ``tile`` elements, never more blocks than there are."""
    return max(1, min(tile // blocksize, triton.next_power_of_2(nblocks)))


def nf4_quantize(x, blocksize: int):
    """See :func:`llmkern.reference.nf4.nf4_quantize_blocks`."""
    require_dtypes(_DTYPES, x=x)
    n = x.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    rows = _rows(blocksize, nblocks)
    with device_guard(x):
        nf4_quantize_kernel[(triton.cdiv(nblocks, rows),)](
            x, _table("bounds", x.device), packed, absmax, n, BLOCKSIZE=blocksize, ROWS=rows,
            num_warps=num_warps_for(rows * blocksize))
    return packed, absmax


def nf4_dynamic_quantize(a, lut, blocksize: int):
    """See :func:`llmkern.reference.dynamic_quantize` (a: (n,) fp32)."""
    a = a.contiguous()
    n = a.numel()
    nblocks = triton.cdiv(n, blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=a.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=a.device)
    rows = _rows(blocksize, nblocks)
    with device_guard(a):
        dynamic_quantize_kernel[(triton.cdiv(nblocks, rows),)](
            a, lut, codes, absmax, n, BLOCKSIZE=blocksize, ROWS=rows, num_warps=num_warps_for(rows * blocksize))
    return codes, absmax


def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, n: int, blocksize: int, nested_blocksize: int,
                   dtype: torch.dtype):
    """See :func:`llmkern.reference.nf4.nf4_dequantize_blocks`."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    nblocks = triton.cdiv(n, blocksize)
    rows = _rows(blocksize, nblocks)
    nested = nested_absmax is not None
    with device_guard(packed):
        nf4_dequantize_kernel[(triton.cdiv(nblocks, rows),)](
            packed, absmax, nested_absmax if nested else absmax, nested_code if nested else absmax,
            offset if nested else absmax, _table("code", packed.device),
            out.view(torch.int16) if dtype == torch.bfloat16 else out, n,
            BLOCKSIZE=blocksize, ROWS=rows, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
            OUT_BF16=dtype == torch.bfloat16, num_warps=num_warps_for(rows * blocksize), enable_fp_fusion=False)
    return out


def _fp32_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize: int):
    if nested_absmax is None:
        return absmax
    scale = nested_absmax.repeat_interleave(nested_blocksize)[:absmax.numel()]
    return nested_code[absmax.long()] * scale + offset


def _gemm_config(m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): the decoded W tile (BLOCK_N x BLOCK_K) needs registers
    for its addresses and scales, so fp32 (FMA-based dots) uses smaller tiles."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    if dtype == torch.float32:
        return 16, 32, 32, 4
    return block_m, 64, 64, 8


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, out_features: int, in_features: int,
               blocksize: int, nested_blocksize: int):
    """See :func:`llmkern.reference.nf4.nf4_linear`: x (M, in) -> (M, out) in x's dtype."""
    require_dtypes(_DTYPES, x=x)
    m = x.shape[0]
    scale = _fp32_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = _gemm_config(m, x.dtype)
    with device_guard(x):
        nf4_linear_kernel[(triton.cdiv(m, bm), triton.cdiv(out_features, bn))](
            x, packed, scale, _table("code", x.device), y, m, out_features, in_features, x.stride(0), y.stride(0),
            QBLOCK=blocksize, PRECISION=_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y


def nf4_linear_grad_input(dy, packed, absmax, nested_absmax, nested_code, offset, out_features: int, in_features: int,
                          blocksize: int, nested_blocksize: int):
    """See :func:`llmkern.reference.nf4.nf4_linear_grad_input`: dy (M, out) -> (M, in) in dy's dtype."""
    require_dtypes(_DTYPES, dy=dy)
    m = dy.shape[0]
    scale = _fp32_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    dx = torch.empty(m, in_features, dtype=dy.dtype, device=dy.device)
    bm, bn, bk, warps = _gemm_config(m, dy.dtype)
    with device_guard(dy):
        nf4_linear_dx_kernel[(triton.cdiv(m, bm), triton.cdiv(in_features, bk))](
            dy, packed, scale, _table("code", dy.device), dx, m, out_features, in_features, dy.stride(0), dx.stride(0),
            QBLOCK=blocksize, PRECISION=_precision(dy.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return dx


_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def aot_specs() -> list[AotSpec]:
    """Default launches: quantize / dequantize for every blocksize and dtype (GPU tile of 4096 values),
    the double-quant quantizer, and the linear forward / input-gradient GEMMs for M <= 16 and M > 32."""
    specs = []
    for bs in reference.BLOCKSIZES:
        rows = max(1, GPU_TILE_ELEMENTS // bs)
        warps = num_warps_for(rows * bs)
        for name, ptr in _PTR.items():
            specs.append(AotSpec(
                name=f"nf4_quantize[BLOCKSIZE={bs}, ROWS={rows}, {name}]", fn=nf4_quantize_kernel,
                signature={"x_ptr": ptr, "bounds_ptr": "*fp32", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64"},
                constants={"BLOCKSIZE": bs, "ROWS": rows}, num_warps=warps))
            for nested in (False, True):
                specs.append(AotSpec(
                    name=f"nf4_dequantize[BLOCKSIZE={bs}, ROWS={rows}, nested={nested}, {name}]",
                    fn=nf4_dequantize_kernel,
                    signature={"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                               "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
                               "code_ptr": "*fp32", "out_ptr": "*i16" if name == "bf16" else ptr, "n": "i64"},
                    constants={"BLOCKSIZE": bs, "ROWS": rows, "NESTED": nested, "NESTED_BLOCKSIZE": 256,
                               "OUT_BF16": name == "bf16"}, num_warps=warps))
    specs.append(AotSpec(
        name="nf4_dynamic_quantize[BLOCKSIZE=256, ROWS=16]", fn=dynamic_quantize_kernel,
        signature={"a_ptr": "*fp32", "lut_ptr": "*u8", "codes_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64"},
        constants={"BLOCKSIZE": 256, "ROWS": 16}, num_warps=num_warps_for(4096)))
    for m in (16, 4096):
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            ptr = _PTR[name]
            bm, bn, bk, warps = _gemm_config(m, dtype)
            consts = {"QBLOCK": 64, "PRECISION": "ieee" if name == "fp32" else "tf32",
                      "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
            specs.append(AotSpec(
                name=f"nf4_linear[BLOCK_M={bm}, {name}]", fn=nf4_linear_kernel,
                signature={"x_ptr": ptr, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                           "y_ptr": ptr, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i64", "stride_ym": "i64"},
                constants=consts, num_warps=warps))
            specs.append(AotSpec(
                name=f"nf4_linear_dx[BLOCK_M={bm}, {name}]", fn=nf4_linear_dx_kernel,
                signature={"dy_ptr": ptr, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                           "dx_ptr": ptr, "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i64", "stride_dxm": "i64"},
                constants=consts, num_warps=warps))
    return list({spec.name: spec for spec in specs}.values())
