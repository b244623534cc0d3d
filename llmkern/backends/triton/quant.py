"""Triton launchers for the int8 absmax / zero-point contract of :mod:`llmkern.reference.quant`.

Kernels: :mod:`llmkern.kernels.quant`. Bytes and values equal the reference's exactly.
"""
from __future__ import annotations

import torch
import triton

from llmkern.backends import require_dtypes
from llmkern.backends.triton._aot import AotSpec
from llmkern.backends.triton._launch import GPU_TILE_ELEMENTS, TILE_ELEMENTS, device_guard, num_warps_for
from llmkern.kernels.quant import int8_dequantize_kernel, int8_quantize_kernel

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(blocksize: int, nblocks: int) -> int:
    return max(1, min(TILE_ELEMENTS // blocksize, triton.next_power_of_2(nblocks)))


def int8_quantize(x, blocksize: int, symmetric: bool):
    """See :func:`llmkern.reference.quant.int8_quantize`."""
    require_dtypes(_DTYPES, x=x)
    n = x.numel()
    nblocks = triton.cdiv(n, blocksize)
    q = torch.empty(n, dtype=torch.int8 if symmetric else torch.uint8, device=x.device)
    scale = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    zero = torch.empty(0 if symmetric else nblocks, dtype=torch.uint8, device=x.device)
    rows = _rows(blocksize, nblocks)
    with device_guard(x):
        int8_quantize_kernel[(triton.cdiv(nblocks, rows),)](
            x, q, scale, q if symmetric else zero, n, SYMMETRIC=symmetric, BLOCKSIZE=blocksize, ROWS=rows,
            num_warps=num_warps_for(rows * blocksize))
    return q, scale, zero


def int8_dequantize(q, scale, zero, blocksize: int, symmetric: bool, dtype: torch.dtype):
    """See :func:`llmkern.reference.quant.int8_dequantize`."""
    n = q.numel()
    nblocks = triton.cdiv(n, blocksize)
    out = torch.empty(n, dtype=dtype, device=q.device)
    rows = _rows(blocksize, nblocks)
    with device_guard(q):
        int8_dequantize_kernel[(triton.cdiv(nblocks, rows),)](
            q, scale, q if symmetric else zero, out.view(torch.int16) if dtype == torch.bfloat16 else out, n,
            SYMMETRIC=symmetric, BLOCKSIZE=blocksize, ROWS=rows, OUT_BF16=dtype == torch.bfloat16,
            num_warps=num_warps_for(rows * blocksize))
    return out


def aot_specs() -> list[AotSpec]:
    """Both schemes at blocksize 64 and 4096 (GPU tile of 4096 values), per input / output dtype."""
    specs = []
    ptrs = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
    for bs in (64, 4096):
        rows = max(1, GPU_TILE_ELEMENTS // bs)
        for symmetric in (True, False):
            kind = "absmax" if symmetric else "zeropoint"
            qptr = "*i8" if symmetric else "*u8"
            for name, ptr in ptrs.items():
                consts = {"SYMMETRIC": symmetric, "BLOCKSIZE": bs, "ROWS": rows}
                specs.append(AotSpec(
                    name=f"int8_quantize[{kind}, BLOCKSIZE={bs}, {name}]", fn=int8_quantize_kernel,
                    signature={"x_ptr": ptr, "q_ptr": qptr, "scale_ptr": "*fp32", "zero_ptr": qptr, "n": "i64"},
                    constants=consts, num_warps=num_warps_for(rows * bs)))
                specs.append(AotSpec(
                    name=f"int8_dequantize[{kind}, BLOCKSIZE={bs}, {name}]", fn=int8_dequantize_kernel,
                    signature={"q_ptr": qptr, "scale_ptr": "*fp32", "zero_ptr": qptr,
                               "out_ptr": "*i16" if name == "bf16" else ptr, "n": "i64"},
                    constants={**consts, "OUT_BF16": name == "bf16"}, num_warps=num_warps_for(rows * bs)))
    return specs
