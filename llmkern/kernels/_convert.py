"""Conversions shared by kernels that must round exactly like torch on GPUs and in the interpreter."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_bits(v):
    """float32 -> bfloat16 bit pattern as int16, rounded to nearest even (NaN -> 0x7FC0), as torch's
    ``.to(torch.bfloat16)``. Store it through an int16 view of the bf16 output: the interpreter's own
    fp32 -> bf16 store truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)
