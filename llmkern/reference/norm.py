"""Reference LayerNorm / RMSNorm and their fused residual-add variants.

Public-style functions (same meaning as ``torch.nn.functional.layer_norm`` / ``rms_norm``) plus the
backend contract used by :mod:`llmkern.ops.norm`, on 2-D rows:

``norm_fwd(x, residual, weight, bias, eps, rms) -> (out, residual_out, mean, rstd)``
    x, residual: (M, N), last dim contiguous; weight, bias: (N,) or None.
    h = x + residual (or x); out = (h - mean) * rstd * weight + bias (mean = 0 for RMSNorm),
    in x's dtype; residual_out = h in residual's dtype (empty when residual is None);
    mean, rstd: (M,) float32 (float64 for float64 input; mean empty for RMSNorm).
``norm_bwd(dy, dresidual_out, h, weight, bias, mean, rstd, eps, rms) -> (dh, dweight, dbias)``
    h: the normalized input (x, or residual_out); dresidual_out: (M, N) or None.
    dh: (M, N) gradient of h, dresidual_out added, computed in fp32 (fp64 for fp64 h) and returned
    in ``torch.promote_types(dy.dtype, h.dtype)``: the input dtype when x and residual share one
    (no extra fp32 pass over the rows), wide enough for both when they differ. dweight/dbias in the
    parameter's dtype, empty tensors when the parameter is None.
"""
from __future__ import annotations

import torch


def _upcast(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.double() if t.dtype == torch.float64 else t.float()


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` computed in fp32 (fp64 for fp64 input), returned in x's dtype."""
    return torch.nn.functional.layer_norm(_upcast(x), normalized_shape, _upcast(weight), _upcast(bias), eps).to(x.dtype)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``F.rms_norm`` computed in fp32 (fp64 for fp64 input); ``eps=None`` means ``finfo(x.dtype).eps``."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    xf = _upcast(x)
    dims = tuple(range(-len(normalized_shape), 0))
    y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * _upcast(weight)
    return y.to(x.dtype)


def add_layer_norm(x, residual, weight, bias, eps=1e-5):
    """``h = x + residual``; returns ``(layer_norm(h), h)``."""
    h = (_upcast(x) + _upcast(residual)).to(residual.dtype)
    return layer_norm(h, (x.shape[-1],), weight, bias, eps).to(x.dtype), h


def add_rms_norm(x, residual, weight, eps=1e-6):
    """``h = x + residual``; returns ``(rms_norm(h), h)``."""
    h = (_upcast(x) + _upcast(residual)).to(residual.dtype)
    return rms_norm(h, (x.shape[-1],), weight, eps).to(x.dtype), h


def _statistics(h: torch.Tensor, eps: float, rms: bool):
    hf = _upcast(h)
    if rms:
        mean = torch.zeros(h.shape[0], dtype=hf.dtype, device=h.device)
        var = hf.pow(2).mean(-1)
    else:
        mean = hf.mean(-1)
        var = (hf - mean[:, None]).pow(2).mean(-1)
    return mean, torch.rsqrt(var + eps)


def _normalize(h, weight, bias, mean, rstd):
    y = (_upcast(h) - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * _upcast(weight)
    if bias is not None:
        y = y + _upcast(bias)
    return y


def norm_fwd(x, residual, weight, bias, eps: float, rms: bool):
    h = x if residual is None else (_upcast(x) + _upcast(residual)).to(residual.dtype)
    mean, rstd = _statistics(h, eps, rms)
    out = _normalize(h, weight, bias, mean, rstd).to(x.dtype)
    residual_out = x.new_empty(0) if residual is None else h
    return out, residual_out, (x.new_empty(0, dtype=rstd.dtype) if rms else mean), rstd


def norm_bwd(dy, dresidual_out, h, weight, bias, mean, rstd, eps: float, rms: bool):
    """Closed-form gradients, with ``xhat = (h - mean) * rstd`` (mean = 0 for RMSNorm) and ``g = dy * weight``:

    LayerNorm: ``dh = rstd * (g - mean(g) - xhat * mean(g * xhat))``
    RMSNorm:   ``dh = rstd * (g - xhat * mean(g * xhat))``
    ``dweight = sum_rows(dy * xhat)``, ``dbias = sum_rows(dy)``; ``dh += dresidual_out``.
    ``eps`` is unused (rstd already holds it); it is part of the contract for backends that recompute.
    """
    hf = _upcast(h)
    dyf = dy.to(hf.dtype)
    mean = torch.zeros_like(rstd) if rms else mean
    xhat = (hf - mean[:, None]) * rstd[:, None]
    g = dyf if weight is None else dyf * weight.to(hf.dtype)
    dh = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not rms:
        dh = dh - g.mean(-1, keepdim=True)
    dh = dh * rstd[:, None]
    if dresidual_out is not None:
        dh = dh + dresidual_out.to(hf.dtype)
    dh = dh.to(torch.promote_types(dy.dtype, h.dtype))
    dw = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else dy.new_empty(0)
    db = dyf.sum(0).to(bias.dtype) if bias is not None else dy.new_empty(0)
    return dh, dw, db
