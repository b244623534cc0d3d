"""C++ CPU implementation (csrc/nf4.cpp) of the nf4 contract of :mod:`llmkern.reference.nf4`.

Bytes, absmax and dequantized values are identical to the reference. ``nf4_linear`` and its input
gradient decode the weight one small tile at a time (never the whole dense W). Importing this module
builds the extension (once, cached) and raises :class:`~llmkern.backends.ExtensionError` when it
cannot be built.
"""
from __future__ import annotations

import torch

from llmkern.backends.cpu import load_extension

_ext = load_extension("nf4")


def _offset(offset: torch.Tensor | None) -> float:
    return 0.0 if offset is None else float(offset)


def nf4_quantize(x, blocksize: int):
    """See :func:`llmkern.reference.nf4.nf4_quantize_blocks`."""
    packed, absmax = _ext.quantize(x, blocksize)
    return packed, absmax


def nf4_dynamic_quantize(a, lut, blocksize: int):
    """See :func:`llmkern.reference.nf4.dynamic_quantize`."""
    codes, absmax = _ext.dynamic_quantize(a.contiguous(), lut, blocksize)
    return codes, absmax


def nf4_dequantize(packed, absmax, nested_absmax, nested_code, offset, n: int, blocksize: int, nested_blocksize: int,
                   dtype: torch.dtype):
    """See :func:`llmkern.reference.nf4.nf4_dequantize_blocks`."""
    out = torch.empty(n, dtype=dtype)
    _ext.dequantize(packed, absmax, nested_absmax, nested_code, _offset(offset), blocksize, nested_blocksize, out)
    return out


def nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, out_features: int, in_features: int,
               blocksize: int, nested_blocksize: int):
    """See :func:`llmkern.reference.nf4.nf4_linear`: x (M, in) -> (M, out), fp32 accumulation."""
    return _ext.linear(x, packed, absmax, nested_absmax, nested_code, _offset(offset), out_features, in_features,
                       blocksize, nested_blocksize)


def nf4_linear_grad_input(dy, packed, absmax, nested_absmax, nested_code, offset, out_features: int, in_features: int,
                          blocksize: int, nested_blocksize: int):
    """See :func:`llmkern.reference.nf4.nf4_linear_grad_input`: dy (M, out) -> (M, in)."""
    return _ext.linear_grad_input(dy, packed, absmax, nested_absmax, nested_code, _offset(offset), out_features,
                                  in_features, blocksize, nested_blocksize)
