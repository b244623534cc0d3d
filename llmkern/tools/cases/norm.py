"""``llmkern check`` entries for the norms: layer_norm, rms_norm and the fused residual-add variants."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern import ops
from llmkern.tools.cases import KernelCase

# Standard transformer rows first, then odd hidden sizes, leading dims and a single row.
SHAPES = ({"x": (16, 1024)}, {"x": (2, 3, 1000)}, {"x": (5, 4097)}, {"x": (1, 7)})
EPS = 1e-5


def _inputs(dtype, device, *, x, residual=False, bias=True):
    n = x[-1]
    args = {
        "x": torch.randn(x, dtype=dtype, device=device),
        "weight": 1 + 0.1 * torch.randn(n, dtype=dtype, device=device),
    }
    if bias:
        args["bias"] = 0.1 * torch.randn(n, dtype=dtype, device=device)
    if residual:
        args["residual"] = torch.randn(x, dtype=dtype, device=device)
    return args


def _torch_add_layer_norm(x, residual, weight, bias):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, EPS), h


def _torch_add_rms_norm(x, residual, weight):
    h = x + residual
    return F.rms_norm(h, (h.shape[-1],), weight, EPS), h


def cases() -> list[KernelCase]:
    return [
        KernelCase(
            op="layer_norm", dispatch="norm_fwd", shapes=SHAPES, inputs=_inputs,
            llmkern=lambda x, weight, bias: ops.layer_norm(x, (x.shape[-1],), weight, bias, EPS),
            torch=lambda x, weight, bias: F.layer_norm(x, (x.shape[-1],), weight, bias, EPS),
            grads=("x", "weight", "bias")),
        KernelCase(
            op="rms_norm", dispatch="norm_fwd", shapes=SHAPES,
            inputs=lambda dtype, device, **s: _inputs(dtype, device, bias=False, **s),
            llmkern=lambda x, weight: ops.rms_norm(x, (x.shape[-1],), weight, EPS),
            torch=lambda x, weight: F.rms_norm(x, (x.shape[-1],), weight, EPS),
            grads=("x", "weight")),
        KernelCase(
            op="add_layer_norm", dispatch="norm_fwd", shapes=SHAPES,
            inputs=lambda dtype, device, **s: _inputs(dtype, device, residual=True, **s),
            llmkern=lambda x, residual, weight, bias: ops.add_layer_norm(x, residual, weight, bias, EPS),
            torch=_torch_add_layer_norm, outputs=("out", "residual"),
            grads=("x", "residual", "weight", "bias")),
        KernelCase(
            op="add_rms_norm", dispatch="norm_fwd", shapes=SHAPES,
            inputs=lambda dtype, device, **s: _inputs(dtype, device, residual=True, bias=False, **s),
            llmkern=lambda x, residual, weight: ops.add_rms_norm(x, residual, weight, EPS),
            torch=_torch_add_rms_norm, outputs=("out", "residual"),
            grads=("x", "residual", "weight")),
    ]
