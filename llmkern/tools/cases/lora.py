"""``llmkern check`` entries for LoRA: ``lora_linear`` over a dense and over an NF4 (QLoRA) base weight.

The PyTorch computation is PEFT's, unfused: ``F.linear(x, W, bias) + scaling * (x @ A.T) @ B.T``
(with W dequantized to the compute dtype for an NF4 base, as PEFT + bitsandbytes do).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmkern import ops
from llmkern.tools.cases import KernelCase
from llmkern.tools.cases.nf4 import dequantized, reference_quantize

SCALING = 2.0
# x: (..., in); out features; rank. Standard first, then odd feature sizes, ranks 1 and 64, 3-D x.
SHAPES = (
    {"x": (64, 256), "out": 256, "r": 16},
    {"x": (3, 7, 100), "out": 37, "r": 1},
    {"x": (33, 100), "out": 37, "r": 64},
)
NF4_SHAPES = ({"x": (64, 256), "out": 128, "r": 16}, {"x": (3, 100), "out": 37, "r": 8})


def _inputs(dtype, device, *, x, out, r, nf4=False):
    n_in = x[-1]
    weight = torch.randn(out, n_in, dtype=dtype, device=device) / math.sqrt(n_in)
    args = {
        "x": torch.randn(x, dtype=dtype, device=device),
        "lora_A": torch.randn(r, n_in, dtype=dtype, device=device) / math.sqrt(n_in),
        "lora_B": torch.randn(out, r, dtype=dtype, device=device) / math.sqrt(r),
        "bias": 0.1 * torch.randn(out, dtype=dtype, device=device),
    }
    if nf4:
        args["packed"], args["state"] = reference_quantize(weight, 64, True)
    else:
        args["weight"] = weight
    return args


def _dense_llmkern(x, weight, lora_A, lora_B, bias):
    return ops.lora_linear(x, weight, lora_A, lora_B, SCALING, bias)


def _dense_torch(x, weight, lora_A, lora_B, bias):
    return F.linear(x, weight, bias) + SCALING * ((x @ lora_A.T) @ lora_B.T)


def _nf4_llmkern(x, packed, state, lora_A, lora_B, bias):
    return ops.lora_linear(x, (packed, state), lora_A, lora_B, SCALING, bias)


def _nf4_torch(x, packed, state, lora_A, lora_B, bias):
    return _dense_torch(x, dequantized(packed, state, x.dtype), lora_A, lora_B, bias)


def cases() -> list[KernelCase]:
    grads = ("x", "lora_A", "lora_B", "bias")
    return [
        KernelCase(op="lora_linear", dispatch="lora_fwd", shapes=SHAPES, inputs=_inputs,
                   llmkern=_dense_llmkern, torch=_dense_torch, grads=grads, dot=True),
        KernelCase(op="lora_linear[nf4]", dispatch="lora_fwd", shapes=NF4_SHAPES,
                   inputs=lambda dtype, device, **s: _inputs(dtype, device, nf4=True, **s),
                   llmkern=_nf4_llmkern, torch=_nf4_torch, grads=grads, dot=True),
    ]
