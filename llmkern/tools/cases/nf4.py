"""``llmkern check`` entries for NF4 and the int8 schemes, and the table of their quantization error.

Quantization codes and scales must be bit-identical: to bitsandbytes where it is installed (CPU
tensors), else to llmkern's reference backend. ``nf4_linear`` is a floating-point op checked with the
2x-torch rule, torch's baseline being bitsandbytes' recipe: dequantize to the compute dtype, then matmul.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import llmkern
from llmkern import ops
from llmkern.tools.cases import ExactCase, KernelCase

QUANT_SHAPES = (
    {"x": (256, 256), "blocksize": 64, "double_quant": True},
    {"x": (7, 129), "blocksize": 64, "double_quant": True},
    {"x": (3, 1000), "blocksize": 256, "double_quant": False},
    {"x": (5, 77), "blocksize": 32, "double_quant": True},
)
INT8_SHAPES = (
    {"x": (256, 256), "blocksize": 64, "symmetric": True},
    {"x": (7, 129), "blocksize": 64, "symmetric": False},
    {"x": (256, 256), "blocksize": 64, "symmetric": False},
    {"x": (3, 1000), "blocksize": 256, "symmetric": True},
)
LINEAR_SHAPES = ({"x": (16, 256), "out": 128}, {"x": (3, 5, 100), "out": 37})


def bnb_functional(device: torch.device):
    """``bitsandbytes.functional`` for CPU tensors when installed, else None."""
    if device.type != "cpu":
        return None
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def reference_quantize(x: torch.Tensor, blocksize: int, double_quant: bool):
    """``nf4_quantize`` on the reference backend (inputs for the cases, independent of the backend checked)."""
    with llmkern.use_backend("reference"):
        return ops.nf4_quantize(x, blocksize, double_quant)


def _state_outputs(packed: torch.Tensor, absmax: torch.Tensor, state2_absmax, offset) -> dict:
    out = {"packed": packed, "absmax": absmax}
    if state2_absmax is not None:
        out["nested_absmax"] = state2_absmax
        out["offset"] = offset.reshape(1)
    return out


def _quantize_inputs(dtype, device, *, x, blocksize, double_quant):
    return {"x": torch.randn(x, dtype=dtype, device=device), "blocksize": blocksize, "double_quant": double_quant}


def _quantize(x, blocksize, double_quant):
    packed, state = ops.nf4_quantize(x, blocksize, double_quant)
    nested = state.state2 if double_quant else None
    return _state_outputs(packed, state.absmax, nested.absmax if nested else None, state.offset)


def _bnb_quantize(x, blocksize, double_quant):
    bnb = bnb_functional(x.device)
    if bnb is None:
        return None
    packed, state = bnb.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    nested = state.state2 if double_quant else None
    return _state_outputs(packed, state.absmax, nested.absmax if nested else None, state.offset)


def _dequantize_inputs(dtype, device, **shape):
    packed, state = reference_quantize(torch.randn(shape["x"], dtype=dtype, device=device), shape["blocksize"],
                                        shape["double_quant"])
    return {"packed": packed, "state": state}


def _dequantize(packed, state):
    return {"out": ops.nf4_dequantize(packed, state)}


def _bnb_dequantize(packed, state):
    bnb = bnb_functional(packed.device)
    if bnb is None or state.dtype != torch.float32:  # bitsandbytes' equality is promised in fp32
        return None
    return {"out": bnb.dequantize_4bit(packed, state.to_bnb())}


def _int8_inputs(dtype, device, *, x, blocksize, symmetric):
    return {"x": torch.randn(x, dtype=dtype, device=device), "blocksize": blocksize, "symmetric": symmetric}


def _int8_quantize(x, blocksize, symmetric):
    q, scale, zero = ops.int8_quantize(x, blocksize, symmetric)
    return {"q": q, "scale": scale} if symmetric else {"q": q, "scale": scale, "zero_point": zero}


def _int8_dequantize_inputs(dtype, device, *, x, blocksize, symmetric):
    with llmkern.use_backend("reference"):
        q, scale, zero = ops.int8_quantize(torch.randn(x, dtype=dtype, device=device), blocksize, symmetric)
    return {"q": q, "scale": scale, "zero_point": zero, "blocksize": blocksize, "dtype": dtype}


def _int8_dequantize(q, scale, zero_point, blocksize, dtype):
    return {"out": ops.int8_dequantize(q, scale, zero_point, blocksize, dtype)}


def _linear_inputs(dtype, device, *, x, out):
    packed, state = reference_quantize(torch.randn(out, x[-1], dtype=dtype, device=device) / math.sqrt(x[-1]),
                                        64, True)
    return {"x": torch.randn(x, dtype=dtype, device=device), "packed": packed, "state": state,
            "bias": 0.1 * torch.randn(out, dtype=dtype, device=device)}


def dequantized(packed, state, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weight as a dense tensor in ``dtype`` (float64: the exact float32 values), by the reference."""
    with llmkern.use_backend("reference"):
        w = ops.nf4_dequantize(packed, state, torch.float32 if dtype == torch.float64 else dtype)
    return w.to(dtype)


def _torch_linear(x, packed, state, bias):
    return F.linear(x, dequantized(packed, state, x.dtype), bias)


def cases() -> list:
    return [
        ExactCase(op="nf4_quantize", dispatch="nf4_quantize", shapes=QUANT_SHAPES, inputs=_quantize_inputs,
                  llmkern=_quantize, expected=_bnb_quantize),
        ExactCase(op="nf4_dequantize", dispatch="nf4_dequantize", shapes=QUANT_SHAPES, inputs=_dequantize_inputs,
                  llmkern=_dequantize, expected=_bnb_dequantize),
        ExactCase(op="int8_quantize", dispatch="int8_quantize", shapes=INT8_SHAPES, inputs=_int8_inputs,
                  llmkern=_int8_quantize),
        ExactCase(op="int8_dequantize", dispatch="int8_dequantize", shapes=INT8_SHAPES,
                  inputs=_int8_dequantize_inputs, llmkern=_int8_dequantize),
        KernelCase(op="nf4_linear", dispatch="nf4_linear", shapes=LINEAR_SHAPES, inputs=_linear_inputs,
                   llmkern=ops.nf4_linear, torch=_torch_linear, grads=("x", "bias"), dot=True),
    ]


def _errors(w: torch.Tensor, w_hat: torch.Tensor) -> dict:
    err = (w_hat.double() - w.double()).reshape(-1)
    std = w.double().std().item()
    return {
        "rmse_rel": err.pow(2).mean().sqrt().item() / std,
        "max_abs_rel": err.abs().max().item() / std,
        "sqnr_db": 10 * math.log10(w.double().pow(2).sum().item() / err.pow(2).sum().item()),
    }


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantization_error(device: torch.device, shape=(1024, 1024), blocksize: int = 64) -> list[dict]:
    """Error of each scheme on N(0, 1) weights, computed with the reference backend.

    bits/param counts everything stored per tensor: codes plus per-block scales (and zero points,
    nested scales and the offset); not the fixed 16/256-entry code tables.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(shape, generator=generator, device=device)
    n = w.numel()
    rows = []
    with llmkern.use_backend("reference"):
        for double_quant in (True, False):
            packed, state = ops.nf4_quantize(w, blocksize, double_quant)
            stored = _nbytes(packed, state.absmax)
            if double_quant:
                stored += _nbytes(state.state2.absmax, state.offset)
            rows.append({"scheme": "NF4" + (" + double quant" if double_quant else ""), "blocksize": blocksize,
                         "bits_per_param": 8 * stored / n, **_errors(w, ops.nf4_dequantize(packed, state))})
        for symmetric in (True, False):
            q, scale, zero = ops.int8_quantize(w, blocksize, symmetric)
            rows.append({"scheme": "int8 absmax" if symmetric else "int8 zero-point", "blocksize": blocksize,
                         "bits_per_param": 8 * _nbytes(q, scale, zero) / n,
                         **_errors(w, ops.int8_dequantize(q, scale, zero, blocksize))})
    return rows
