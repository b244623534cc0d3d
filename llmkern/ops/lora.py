"""LoRA / QLoRA linear: public API, custom ops, autograd.

``lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0)`` computes
``x W^T + bias + scaling * (D(x) A^T) B^T`` with W frozen, as PEFT's ``lora.Linear`` /
``lora.Linear4bit``. Two ``torch.library`` custom ops work on 2-D rows::

    llmkern::lora_fwd(x, weight, absmax?, code?, blocksize, lora_A, lora_B, bias?, scaling, dropout_p, seed) -> (out, xa)
    llmkern::lora_bwd(dy, x, weight, absmax?, code?, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx)
        -> (dx, dA, dB)

Their meaning is given by :mod:`llmkern.reference.lora`; each backend implements that contract. An
NF4 weight reaches them as its packed bytes plus the decoded float32 per-block absmax (double
quantization undone here, a tensor of ``out*in/blocksize`` floats) and the 16-entry code; the dense
W is never formed outside the reference backend.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import torch

from llmkern.backends import dispatch, register
from llmkern.ops._validate import FLOAT_DTYPES, check_same_device, check_tensor, rows_2d
from llmkern.quant_state import QuantState
from llmkern.reference import lora as reference
from llmkern.reference.nf4 import nf4_absmax

register(
    "lora_fwd",
    triton="llmkern.backends.triton.lora:lora_fwd",
    cpu="llmkern.backends.cpu.lora:lora_fwd",
    reference="llmkern.reference.lora:lora_fwd",
)
register(
    "lora_bwd",
    triton="llmkern.backends.triton.lora:lora_bwd",
    cpu="llmkern.backends.cpu.lora:lora_bwd",
    reference="llmkern.reference.lora:lora_bwd",
)

NF4Weight = tuple[torch.Tensor, QuantState]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("llmkern::lora_fwd", mutates_args=())
def _lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: Optional[torch.Tensor],
    code: Optional[torch.Tensor],
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    empty = x.shape[0] == 0 or x.shape[1] == 0
    impl = reference.lora_fwd if empty else dispatch("lora_fwd", x.device)
    return impl(x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed)


@_lora_fwd.register_fake
def _(x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed):
    m = x.shape[0]
    return x.new_empty((m, lora_B.shape[0])), x.new_empty((m, lora_A.shape[0]), dtype=_acc_dtype(x))


@torch.library.custom_op("llmkern::lora_bwd", mutates_args=())
def _lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: Optional[torch.Tensor],
    code: Optional[torch.Tensor],
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    empty = x.shape[0] == 0 or x.shape[1] == 0
    impl = reference.lora_bwd if empty else dispatch("lora_bwd", x.device)
    return impl(dy, x, weight, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx)


@_lora_bwd.register_fake
def _(dy, x, weight, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, absmax, code, lora_A, lora_B, output[1])
    ctx.blocksize, ctx.scaling, ctx.dropout_p, ctx.seed = blocksize, scaling, dropout_p, seed
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dout, _dxa):
    x, weight, absmax, code, lora_A, lora_B, xa = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, d_a, d_b = _lora_bwd(dout, x, weight, absmax, code, ctx.blocksize, lora_A, lora_B, xa, ctx.scaling,
                             ctx.dropout_p, ctx.seed, need_dx)
    d_bias = dout.sum(0, dtype=_acc_dtype(dout)).to(ctx.bias_dtype) if ctx.needs_input_grad[7] else None
    return (dx if need_dx else None, None, None, None, None, d_a, d_b, d_bias, None, None, None)


_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def _nf4_parts(op: str, weight, x: torch.Tensor, out_features: int, in_features: int):
    """(packed, absmax_f32, code, blocksize) of an NF4 weight ``(packed, QuantState)``, checked."""
    if len(weight) != 2 or not isinstance(weight[1], QuantState):
        got = ", ".join(type(w).__name__ for w in weight)
        raise TypeError(f"llmkern.{op}: an NF4 weight must be a pair (packed, llmkern.QuantState) "
                        f"(QuantState.from_bnb converts a bitsandbytes state), got ({got})")
    packed, state = weight
    check_tensor(op, "weight[0] (packed NF4)", packed, dtypes=(torch.uint8,))
    if tuple(state.shape) != (out_features, in_features):
        raise ValueError(f"llmkern.{op}: the NF4 weight must have shape (out_features, in_features) = "
                         f"({out_features}, {in_features}) from lora_B and x, got {tuple(state.shape)}")
    # Metadata checks only (QuantState.validate also compares the code table on the host: a GPU sync per call).
    n = out_features * in_features
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"llmkern.{op}: the packed weight must be uint8 with {(n + 1) // 2} bytes for shape "
                         f"({out_features}, {in_features}), got {packed.numel()} elements")
    want = torch.uint8 if state.nested else torch.float32
    if state.absmax.dtype != want or state.absmax.numel() != -(-n // state.blocksize):
        raise ValueError(f"llmkern.{op}: the quant state's absmax must be {want} with {-(-n // state.blocksize)} "
                         f"entries for blocksize {state.blocksize}, got {state.absmax.dtype} with {state.absmax.numel()}")
    if state.quant_type != "nf4" or state.code.numel() != 16:
        raise ValueError(f"llmkern.{op}: the quant state must be nf4 with a 16-entry code, got {state!r}")
    check_same_device(op, x=x, packed=packed, absmax=state.absmax)
    if state.nested:
        absmax = nf4_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
    else:
        absmax = state.absmax.float()
    return packed, absmax, state.code.to(torch.float32), state.blocksize


def _check_dense(op: str, weight, x: torch.Tensor, out_features: int, in_features: int) -> None:
    check_tensor(op, "weight", weight, dtypes=(x.dtype,), ndim=2)
    if weight.shape[1] != in_features:
        raise ValueError(f"llmkern.{op}: in_features mismatch: x has {in_features} features (last dim) but weight "
                         f"(out, in) has shape {tuple(weight.shape)}")
    if weight.shape[0] != out_features:
        raise ValueError(f"llmkern.{op}: out_features mismatch: lora_B (out, r) has {out_features} rows but weight "
                         f"(out, in) has shape {tuple(weight.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"llmkern.{op}: weight must be frozen (requires_grad=False): lora_linear gives no gradient to W")


def lora_linear(x: torch.Tensor, weight: Union[torch.Tensor, NF4Weight], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                *, seed: int | None = None) -> torch.Tensor:
    """LoRA linear layer: ``x @ W.T + bias + scaling * (dropout(x) @ A.T) @ B.T`` (PEFT ``lora.Linear``).

    x: (..., in_features), float32/float16/bfloat16 (float64 through the reference and cpu backends).
    weight: the frozen base weight, either a dense (out_features, in_features) tensor in x's dtype
        with ``requires_grad=False``, or an NF4 weight given as the pair ``(packed, state)``: ``packed``
        the uint8 nibbles (bitsandbytes' ``((out*in + 1) // 2, 1)`` layout) and ``state`` a
        :class:`llmkern.QuantState` of shape (out_features, in_features) — what
        ``llmkern.nn.LinearNF4`` stores; a bitsandbytes ``Linear4bit`` converts with
        ``(layer.weight.data, QuantState.from_bnb(layer.weight.quant_state))``. NF4 tiles are
        dequantized in x's dtype (the compute dtype), inside the GEMM on the Triton backend.
    lora_A: (r, in_features), lora_B: (out_features, r), bias: (out_features,) or None; all in x's dtype.
    scaling: the LoRA scale, ``lora_alpha / r`` in PEFT.
    dropout_p: LoRA dropout probability in [0, 1), applied to x on the LoRA branch only (x is scaled by
        ``1 / (1 - p)`` where kept). The mask is a function of ``seed`` and each element's position in
        the 2-D (rows, in_features) view of x (see :mod:`llmkern.reference.lora`); it is regenerated
        in the backward, never stored. ``seed`` (keyword, in [0, 2**31 - 1)) defaults to a draw from
        torch's default generator, so ``torch.manual_seed`` makes runs repeatable. Pass
        ``dropout_p=0.0`` in eval mode.

    Returns (..., out_features) in x's dtype. Gradients flow to x, lora_A, lora_B (and bias if it
    requires grad); W gets none. The (rows, r) product ``dropout(x) @ A.T`` is kept in fp32 for the
    backward.
    """
    op = "lora_linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    in_features = x.shape[-1]
    check_tensor(op, "lora_A", lora_A, dtypes=(x.dtype,), ndim=2)
    check_tensor(op, "lora_B", lora_B, dtypes=(x.dtype,), ndim=2)
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"llmkern.{op}: lora_A (r, in_features) must have rank r >= 1, got shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"llmkern.{op}: in_features mismatch: x has {in_features} features (last dim) but lora_A "
                         f"(r, in) has shape {tuple(lora_A.shape)}")
    if lora_B.shape[1] != rank:
        raise ValueError(f"llmkern.{op}: rank mismatch: lora_A (r, in) has rank {rank} but lora_B (out, r) has shape "
                         f"{tuple(lora_B.shape)}")
    out_features = lora_B.shape[0]
    if isinstance(weight, torch.Tensor):
        _check_dense(op, weight, x, out_features, in_features)
        w, absmax, code, blocksize = weight, None, None, 0
    elif isinstance(weight, (tuple, list)):
        w, absmax, code, blocksize = _nf4_parts(op, weight, x, out_features, in_features)
    else:
        raise TypeError(f"llmkern.{op}: weight must be a dense tensor or a pair (packed, QuantState), "
                        f"got {type(weight).__name__}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=(x.dtype,), shape=(out_features,))
    check_same_device(op, x=x, weight=w, lora_A=lora_A, lora_B=lora_B, bias=bias)
    if not isinstance(scaling, Real) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise TypeError(f"llmkern.{op}: scaling must be a finite real number, got {scaling!r}")
    if not isinstance(dropout_p, Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"llmkern.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0.0:
        if seed is None:
            seed = int(torch.randint(0, reference.MAX_SEED, ()).item())
        elif not isinstance(seed, int) or not 0 <= seed < reference.MAX_SEED:
            raise ValueError(f"llmkern.{op}: seed must be an int in [0, {reference.MAX_SEED}), got {seed!r}")
    else:
        seed = 0
    x2 = rows_2d(x, in_features)
    out, _ = _lora_fwd(x2, w, absmax, code, blocksize, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed)
    return out.view(*x.shape[:-1], out_features)
