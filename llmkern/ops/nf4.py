"""NF4 4-bit block quantization with double quantization (QLoRA), byte-identical to bitsandbytes.

Public functions: :func:`nf4_quantize`, :func:`nf4_dequantize`, :func:`nf4_linear`. The layout of
the packed bytes and of :class:`llmkern.QuantState` is documented in :mod:`llmkern.quant_state`;
the algorithm (rounding, ties, padding) in :mod:`llmkern.reference.nf4`.

Custom ops (1-D views, dispatching per backend)::

    llmkern::nf4_quantize(x, blocksize) -> (packed, absmax)
    llmkern::nf4_dynamic_quantize(a, lut, blocksize) -> (codes, absmax)          # double quant
    llmkern::nf4_dequantize(packed, absmax, nested_absmax?, nested_code?, offset?, n, blocksize,
                            nested_blocksize, dtype) -> out
    llmkern::nf4_linear(x, packed, absmax, ..., out_features, in_features, blocksize, nested_blocksize) -> y
    llmkern::nf4_linear_grad_input(dy, packed, absmax, ...) -> dx
"""
from __future__ import annotations

from typing import Optional

import torch

from llmkern.backends import dispatch, register
from llmkern.ops._validate import check_same_device, check_tensor
from llmkern.quant_state import QuantState
from llmkern.reference import nf4 as reference

QUANT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_REFERENCE = {
    "nf4_quantize": "nf4_quantize_blocks",
    "nf4_dynamic_quantize": "dynamic_quantize",
    "nf4_dequantize": "nf4_dequantize_blocks",
    "nf4_linear": "nf4_linear",
    "nf4_linear_grad_input": "nf4_linear_grad_input",
}
for _op, _ref in _REFERENCE.items():
    register(_op, triton=f"llmkern.backends.triton.nf4:{_op}", cpu=f"llmkern.backends.cpu.nf4:{_op}",
             reference=f"llmkern.reference.nf4:{_ref}")

_LUTS: dict[torch.device, torch.Tensor] = {}


def _dynamic_lut(device: torch.device) -> torch.Tensor:
    lut = _LUTS.get(device)
    if lut is None:
        lut = _LUTS[device] = reference.dynamic_lut(device)
    return lut


@torch.library.custom_op("llmkern::nf4_quantize", mutates_args=())
def _nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("nf4_quantize", x.device)(x, blocksize)


@_nf4_quantize.register_fake
def _(x, blocksize):
    n = x.numel()
    return x.new_empty((n + 1) // 2, dtype=torch.uint8), x.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("llmkern::nf4_dynamic_quantize", mutates_args=())
def _nf4_dynamic_quantize(a: torch.Tensor, lut: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("nf4_dynamic_quantize", a.device)(a, lut, blocksize)


@_nf4_dynamic_quantize.register_fake
def _(a, lut, blocksize):
    n = a.numel()
    return a.new_empty(n, dtype=torch.uint8), a.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("llmkern::nf4_dequantize", mutates_args=())
def _nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], n: int, blocksize: int,
                    nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    return dispatch("nf4_dequantize", packed.device)(packed, absmax, nested_absmax, nested_code, offset, n,
                                                     blocksize, nested_blocksize, dtype)


@_nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, n, blocksize, nested_blocksize, dtype):
    return packed.new_empty(n, dtype=dtype)


@torch.library.custom_op("llmkern::nf4_linear", mutates_args=())
def _nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], out_features: int,
                in_features: int, blocksize: int, nested_blocksize: int) -> torch.Tensor:
    impl = reference.nf4_linear if x.shape[0] == 0 else dispatch("nf4_linear", x.device)
    return impl(x, packed, absmax, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                nested_blocksize)


@_nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, out_features, in_features, blocksize, nested_blocksize):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("llmkern::nf4_linear_grad_input", mutates_args=())
def _nf4_linear_grad_input(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                           nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                           offset: Optional[torch.Tensor], out_features: int, in_features: int, blocksize: int,
                           nested_blocksize: int) -> torch.Tensor:
    impl = reference.nf4_linear_grad_input if dy.shape[0] == 0 else dispatch("nf4_linear_grad_input", dy.device)
    return impl(dy, packed, absmax, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                nested_blocksize)


@_nf4_linear_grad_input.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, offset, out_features, in_features, blocksize, nested_blocksize):
    return dy.new_empty(dy.shape[0], in_features)


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:6])
    ctx.dims = inputs[6:]


def _linear_backward(ctx, dy):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    dx = _nf4_linear_grad_input(dy.contiguous(), packed, absmax, nested_absmax, nested_code, offset, *ctx.dims)
    return (dx,) + (None,) * 9


_nf4_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _state_args(op: str, packed: torch.Tensor, state: QuantState):
    if not isinstance(state, QuantState):
        raise TypeError(f"llmkern.{op}: state must be a llmkern.QuantState, got {type(state).__name__}")
    check_tensor(op, "packed", packed, dtypes=(torch.uint8,))
    state.validate(packed, where=op)
    nested = state.state2
    check_same_device(op, packed=packed, absmax=state.absmax, nested_absmax=None if nested is None else nested.absmax)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if nested is None:
        return packed.reshape(-1), state.absmax.reshape(-1), None, None, None, reference.NESTED_BLOCKSIZE
    return (packed.reshape(-1), state.absmax.reshape(-1), nested.absmax.reshape(-1),
            nested.code.to(packed.device, torch.float32).reshape(-1),
            state.offset.to(packed.device, torch.float32).reshape(()), nested.blocksize)


def nf4_quantize(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``x`` to NF4 in blocks of ``blocksize`` values, as bitsandbytes ``quantize_4bit(quant_type="nf4")``.

    x: any shape and strides, float32/float16/bfloat16, at least one element (not differentiated).
    blocksize: one of 32, 64, 128, 256, 512, 1024, 2048, 4096.
    double_quant: also quantize the float32 absmax to 8 bits (dynamic map, blocks of 256, offset =
    their mean), bitsandbytes' ``compress_statistics=True``.

    Returns ``(packed, state)``: ``packed`` uint8 ``((n + 1) // 2, 1)``, first element in the high
    nibble; ``state`` a :class:`llmkern.QuantState`. Bytes, absmax, nested absmax, offset are
    bit-identical to bitsandbytes' CPU path.
    """
    op = "nf4_quantize"
    check_tensor(op, "x", x, dtypes=QUANT_DTYPES)
    if blocksize not in reference.BLOCKSIZES:
        raise ValueError(f"llmkern.{op}: blocksize must be one of {reference.BLOCKSIZES}, got {blocksize!r}")
    if x.numel() == 0:
        raise ValueError(f"llmkern.{op}: x must have at least one element, got shape {tuple(x.shape)}")
    flat = x.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    packed, absmax = _nf4_quantize(flat, blocksize)
    code = reference.nf4_code(x.device)
    if not double_quant:
        state = QuantState(absmax, x.shape, x.dtype, blocksize, code=code)
    else:
        offset = absmax.mean()
        codes, absmax2 = _nf4_dynamic_quantize(absmax - offset, _dynamic_lut(x.device), reference.NESTED_BLOCKSIZE)
        state = QuantState(codes, x.shape, x.dtype, blocksize, code=code, offset=offset,
                           state2=QuantState.nested_state(absmax2, reference.dynamic_code(x.device)))
    return packed.view(-1, 1), state


def nf4_dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize NF4 ``packed`` bytes with their ``state``: a tensor of ``state.shape``.

    dtype: float32/float16/bfloat16, default ``state.dtype``. Each value is
    ``float32(code[nibble] * absmax[block])`` (absmax decoded from double quant in the same pass),
    then rounded to ``dtype``: equal to bitsandbytes ``dequantize_4bit``.
    """
    op = "nf4_dequantize"
    dtype = state.dtype if dtype is None and isinstance(state, QuantState) else dtype
    if dtype not in QUANT_DTYPES:
        raise TypeError(f"llmkern.{op}: dtype must be one of float32, float16, bfloat16, got {dtype}")
    p, absmax, nested_absmax, nested_code, offset, nbs = _state_args(op, packed, state)
    out = _nf4_dequantize(p, absmax, nested_absmax, nested_code, offset, state.numel, state.blocksize, nbs, dtype)
    return out.view(state.shape)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` the NF4 weight ``(out_features, in_features)`` given by ``(packed, state)``.

    x: (..., in_features) float32/float16/bfloat16; the product accumulates in float32 and the
    result has x's dtype, shape (..., out_features). For fp16/bf16 x the weight enters the products
    in x's dtype, as in torch's own half-precision linear (on GPU tensor-core dots; on CPUs with
    AVX512-BF16 the bf16 NF4 codes, with the fp32 block scales applied to each block's partial sum,
    as bitsandbytes' CPU kernel does). bias: (out_features,) or None, added in x's dtype. Gradients
    flow to x (``dx = dy @ W``) and bias; W is frozen. No backend holds the whole dense W except the
    reference: the C++ one decodes a few rows x 1024 columns at a time, Triton tiles in registers.
    """
    op = "nf4_linear"
    check_tensor(op, "x", x, dtypes=QUANT_DTYPES, min_ndim=1)
    args = _state_args(op, packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"llmkern.{op}: the weight must be 2-D (out_features, in_features), got shape {tuple(state.shape)}")
    out_features, in_features = state.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"llmkern.{op}: x must have last dim in_features={in_features}, got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=QUANT_DTYPES, shape=(out_features,))
    check_same_device(op, x=x, packed=packed, bias=bias)
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _nf4_linear(x2, *args[:5], out_features, in_features, state.blocksize, args[5])
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], out_features)
