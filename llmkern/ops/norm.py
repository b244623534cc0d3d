"""LayerNorm, RMSNorm and the fused residual-add variants: public API, custom ops, autograd.

The two ``torch.library`` custom ops work on 2-D rows and are the same for all four functions::

    llmkern::norm_fwd(x, residual?, weight?, bias?, eps, rms) -> (out, residual_out, mean, rstd)
    llmkern::norm_bwd(dy, dresidual_out?, h, weight?, bias?, mean, rstd, eps, rms) -> (dh, dweight, dbias)

Their meaning is given by :mod:`llmkern.reference.norm`; each backend implements that contract.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from llmkern.backends import dispatch, register
from llmkern.reference import norm as reference
from llmkern.ops._validate import FLOAT_DTYPES, check_same_device, check_tensor, rows_2d

MAX_HIDDEN = 65536

register(
    "norm_fwd",
    triton="llmkern.backends.triton.norm:norm_fwd",
    cpu="llmkern.backends.cpu.norm:norm_fwd",
    reference="llmkern.reference.norm:norm_fwd",
)
register(
    "norm_bwd",
    triton="llmkern.backends.triton.norm:norm_bwd",
    cpu="llmkern.backends.cpu.norm:norm_bwd",
    reference="llmkern.reference.norm:norm_bwd",
)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("llmkern::norm_fwd", mutates_args=())
def _norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = reference.norm_fwd if x.shape[0] == 0 else dispatch("norm_fwd", x.device)
    return impl(x, residual, weight, bias, eps, rms)


@_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, rms):
    m = x.shape[0]
    sd = _stat_dtype(x if residual is None else residual)  # statistics are of h, which has residual's dtype
    res = x.new_empty(0) if residual is None else residual.new_empty(x.shape)
    mean = x.new_empty(0 if rms else m, dtype=sd)
    return x.new_empty(x.shape), res, mean, x.new_empty(m, dtype=sd)


@torch.library.custom_op("llmkern::norm_bwd", mutates_args=())
def _norm_bwd(
    dy: torch.Tensor,
    dresidual_out: Optional[torch.Tensor],
    h: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = reference.norm_bwd if h.shape[0] == 0 else dispatch("norm_bwd", h.device)
    return impl(dy, dresidual_out, h, weight, bias, mean, rstd, eps, rms)


@_norm_bwd.register_fake
def _(dy, dresidual_out, h, weight, bias, mean, rstd, eps, rms):
    dw = weight.new_empty(weight.shape) if weight is not None else dy.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else dy.new_empty(0)
    return h.new_empty(h.shape, dtype=torch.promote_types(dy.dtype, h.dtype)), dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms = inputs
    _, residual_out, mean, rstd = output
    h = x if residual is None else residual_out
    ctx.save_for_backward(h, weight, bias, mean, rstd)
    ctx.eps, ctx.rms, ctx.has_residual = eps, rms, residual is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, dy, dresidual_out, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h, dtype=ctx.x_dtype)
    dres = dresidual_out if ctx.has_residual else None
    dh, dw, db = _norm_bwd(dy, dres, h, weight, bias, mean, rstd, ctx.eps, ctx.rms)
    dx = dh.to(ctx.x_dtype)
    dresidual = dh.to(ctx.residual_dtype) if ctx.has_residual else None
    return dx, dresidual, (dw if weight is not None else None), (db if bias is not None else None), None, None


_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(op, x, n_dims, weight, bias, residual=None):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=FLOAT_DTYPES, shape=x.shape)
    norm_shape = tuple(x.shape[x.dim() - n_dims:]) if n_dims <= x.dim() else None
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(op, name, p, dtypes=FLOAT_DTYPES, shape=norm_shape)
    check_same_device(op, x=x, residual=residual, weight=weight, bias=bias)


def _normalized_size(op: str, x: torch.Tensor, normalized_shape) -> int:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(x.shape[x.dim() - len(shape):]) != shape or len(shape) > x.dim():
        raise ValueError(f"llmkern.{op}: normalized_shape must be a non-empty suffix of x.shape {tuple(x.shape)}, got {shape}")
    n = 1
    for s in shape:
        n *= s
    if not 1 <= n <= MAX_HIDDEN:
        raise ValueError(f"llmkern.{op}: the normalized size must be in [1, {MAX_HIDDEN}], got {n}")
    return n


def _run(x, residual, weight, bias, eps, rms, n):
    x2 = rows_2d(x, n)
    r2 = None if residual is None else rows_2d(residual, n)
    w = None if weight is None else weight.reshape(n)
    b = None if bias is None else bias.reshape(n)
    out, residual_out, _, _ = _norm_fwd(x2, r2, w, b, float(eps), rms)
    return out.view(x.shape), (None if residual is None else residual_out.view(x.shape))


def layer_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.layer_norm``.

    x: (..., *normalized_shape), float32/float16/bfloat16/float64, any strides. weight, bias:
    ``normalized_shape`` or None. Statistics in fp32; the result has x's dtype and shape.
    Normalized size at most 65536.
    """
    op = "layer_norm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    n = _normalized_size(op, x, normalized_shape)
    _check(op, x, len((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape), weight, bias)
    return _run(x, None, weight, bias, eps, False, n)[0]


def rms_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """Root-mean-square normalization, as ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x**2) + eps) * weight`` over the trailing ``normalized_shape`` dims;
    ``eps=None`` uses ``torch.finfo(x.dtype).eps`` like torch. Shapes and dtypes as :func:`layer_norm`.
    """
    op = "rms_norm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    n = _normalized_size(op, x, normalized_shape)
    _check(op, x, len((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape), weight, None)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return _run(x, None, weight, None, eps, True, n)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + LayerNorm over the last dim, one pass (pre-norm transformer blocks).

    x, residual: (..., N), same shape. Returns ``(out, new_residual)`` with
    ``new_residual = x + residual`` (residual's dtype) and ``out = layer_norm(new_residual)`` (x's dtype).
    Gradients flow to x, residual, weight and bias through both outputs.
    """
    op = "add_layer_norm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    n = _normalized_size(op, x, x.shape[-1])
    _check(op, x, 1, weight, bias, residual)
    return _run(x, residual, weight, bias, eps, False, n)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm over the last dim: ``new_residual = x + residual``, ``out = rms_norm(new_residual)``.

    Shapes and dtypes as :func:`add_layer_norm`.
    """
    op = "add_rms_norm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    n = _normalized_size(op, x, x.shape[-1])
    _check(op, x, 1, weight, None, residual)
    return _run(x, residual, weight, None, eps, True, n)
