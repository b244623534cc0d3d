"""int8 block quantization, symmetric (absmax) and asymmetric (zero-point): the textbook 8-bit
schemes, to compare their error with NF4's. The exact arithmetic is :mod:`llmkern.reference.quant`.

Custom ops (1-D, dispatching per backend)::

    llmkern::int8_quantize(x, blocksize, symmetric) -> (q, scale, zero)
    llmkern::int8_dequantize(q, scale, zero, blocksize, symmetric, dtype) -> out
"""
from __future__ import annotations

import torch

from llmkern.backends import dispatch, register
from llmkern.ops._validate import check_same_device, check_tensor
from llmkern.reference.nf4 import BLOCKSIZES

QUANT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

for _op in ("int8_quantize", "int8_dequantize"):
    register(_op, triton=f"llmkern.backends.triton.quant:{_op}", reference=f"llmkern.reference.quant:{_op}")


@torch.library.custom_op("llmkern::int8_quantize", mutates_args=())
def _int8_quantize(x: torch.Tensor, blocksize: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch("int8_quantize", x.device)(x, blocksize, symmetric)


@_int8_quantize.register_fake
def _(x, blocksize, symmetric):
    nb = -(-x.numel() // blocksize)
    q = x.new_empty(x.numel(), dtype=torch.int8 if symmetric else torch.uint8)
    return q, x.new_empty(nb, dtype=torch.float32), x.new_empty(0 if symmetric else nb, dtype=torch.uint8)


@torch.library.custom_op("llmkern::int8_dequantize", mutates_args=())
def _int8_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, blocksize: int, symmetric: bool,
                     dtype: torch.dtype) -> torch.Tensor:
    return dispatch("int8_dequantize", q.device)(q, scale, zero, blocksize, symmetric, dtype)


@_int8_dequantize.register_fake
def _(q, scale, zero, blocksize, symmetric, dtype):
    return q.new_empty(q.numel(), dtype=dtype)


def _check_blocksize(op: str, blocksize) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"llmkern.{op}: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def int8_quantize(x: torch.Tensor, blocksize: int = 64, symmetric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x`` to 8 bits per value in blocks of ``blocksize`` consecutive elements.

    x: any shape, float32/float16/bfloat16, at least one element (not differentiated).
    symmetric=True (absmax): ``q`` int8 in [-127, 127], ``x ~ q * scale``, ``zero_point`` None.
    symmetric=False (zero-point): ``q`` uint8, ``x ~ (q - zero_point) * scale``; the block's range is
    widened to hold 0, which is then exact.
    Returns ``(q, scale, zero_point)``: q of x's shape; scale (nblocks,) float32; zero_point
    (nblocks,) uint8 or None.
    """
    op = "int8_quantize"
    check_tensor(op, "x", x, dtypes=QUANT_DTYPES)
    _check_blocksize(op, blocksize)
    if x.numel() == 0:
        raise ValueError(f"llmkern.{op}: x must have at least one element, got shape {tuple(x.shape)}")
    q, scale, zero = _int8_quantize(x.detach().reshape(-1).contiguous(), blocksize, bool(symmetric))
    return q.view(x.shape), scale, (None if symmetric else zero)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None, blocksize: int = 64,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`int8_quantize`: ``q * scale`` (int8 ``q``, ``zero_point`` None) or
    ``(q - zero_point) * scale`` (uint8 ``q``), per block; a tensor of q's shape in ``dtype``."""
    op = "int8_dequantize"
    symmetric = zero_point is None
    check_tensor(op, "q", q, dtypes=(torch.int8,) if symmetric else (torch.uint8,))
    _check_blocksize(op, blocksize)
    nb = -(-q.numel() // blocksize)
    check_tensor(op, "scale", scale, dtypes=(torch.float32,), shape=(nb,))
    if not symmetric:
        check_tensor(op, "zero_point", zero_point, dtypes=(torch.uint8,), shape=(nb,))
    if dtype not in QUANT_DTYPES:
        raise TypeError(f"llmkern.{op}: dtype must be one of float32, float16, bfloat16, got {dtype}")
    check_same_device(op, q=q, scale=scale, zero_point=zero_point)
    zero = q.new_empty(0, dtype=torch.uint8) if symmetric else zero_point.contiguous()
    out = _int8_dequantize(q.reshape(-1).contiguous(), scale.contiguous(), zero, blocksize, symmetric, dtype)
    return out.view(q.shape)
