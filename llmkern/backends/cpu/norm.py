"""C++ CPU implementation (csrc/norm.cpp) of the norm contract of :mod:`llmkern.reference.norm`.

fp32/fp16/bf16 rows with any row stride; float64 raises :class:`~llmkern.backends.Unsupported` (the
call falls back to the reference). Weight and bias are passed to C++ as fp32; dweight/dbias come back
as fp32 sums and are returned in the parameter's dtype. Importing this module builds the extension
(once, cached) and raises :class:`~llmkern.backends.ExtensionError` when it cannot be built.
"""
from __future__ import annotations

import torch

from llmkern.backends import require_dtypes
from llmkern.backends.cpu import load_extension

_ext = load_extension("norm")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fp32(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.to(torch.float32).contiguous()


def norm_fwd(x, residual, weight, bias, eps: float, rms: bool):
    """See :func:`llmkern.reference.norm.norm_fwd`; x, residual: (M, N); weight, bias: (N,) or None."""
    require_dtypes(_DTYPES, x=x, residual=residual, weight=weight, bias=bias)
    out, residual_out, mean, rstd = _ext.norm_fwd(x, residual, _fp32(weight), _fp32(bias), float(eps), bool(rms))
    return out, residual_out, mean, rstd


def norm_bwd(dy, dresidual_out, h, weight, bias, mean, rstd, eps: float, rms: bool):
    """See :func:`llmkern.reference.norm.norm_bwd`; dweight/dbias are deterministic."""
    require_dtypes(_DTYPES, dy=dy, dresidual_out=dresidual_out, h=h, weight=weight, bias=bias)
    dh, dw, db = _ext.norm_bwd(dy, dresidual_out, h, _fp32(weight), mean, rstd, bool(rms), bias is not None)
    dweight = dw.to(weight.dtype) if weight is not None else dy.new_empty(0)
    dbias = db.to(bias.dtype) if bias is not None else dy.new_empty(0)
    return dh, dweight, dbias
