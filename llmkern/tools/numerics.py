"""The numerics rule of DESIGN.md, in one place (``tests/_numerics.py`` and ``llmkern check`` use it).

A kernel's error against a high-precision reference must be at most ``RATIO`` (2x) the error of
PyTorch's own same-dtype computation against that reference, plus a small per-dtype ``atol``.
Errors are max-abs over all elements, computed in float64 on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RATIO = 2.0

# Slack added to the 2x rule: covers rounding of the output itself (one ulp at |y| ~ 1-4).
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def flat64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D float64 CPU tensor (for error measurements)."""
    return t.detach().to("cpu", torch.float64).reshape(-1)


def _max(t: torch.Tensor) -> float:
    """Largest value of ``t``; NaN anywhere counts as infinite; 0 for an empty tensor."""
    if t.numel() == 0:
        return 0.0
    value = float(t.max())
    return float("inf") if math.isnan(value) else value


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|``; NaN anywhere counts as infinite error; 0 for empty tensors."""
    return _max((flat64(actual) - flat64(expected)).abs())


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / |expected|`` (denominator clamped at 1e-12); NaN counts as infinite."""
    e = flat64(expected)
    return _max((flat64(actual) - e).abs() / e.abs().clamp_min(1e-12))


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """``max abs err E at index I (got a, want b); max rel err R at index J``."""
    a, e = flat64(actual), flat64(expected)
    if a.numel() == 0:
        return "empty tensors"
    diff = (a - e).abs()
    i = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    rel = diff / e.abs().clamp_min(1e-12)
    j = int(torch.nan_to_num(rel, nan=float("inf")).argmax())
    shape = tuple(actual.shape)
    where_i = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), shape)) if shape else ()
    where_j = tuple(int(v) for v in torch.unravel_index(torch.tensor(j), shape)) if shape else ()
    return (f"max abs err {diff[i].item():.3e} at {where_i} (got {a[i].item():.6g}, want {e[i].item():.6g}); "
            f"max rel err {rel[j].item():.3e} at {where_j}")


def default_atol(dtype: torch.dtype) -> float:
    return ATOL.get(dtype, ATOL[torch.float32])


@dataclass(frozen=True)
class Verdict:
    """Outcome of one comparison: the errors of ``actual``, the bound it had to meet, and whether it did."""

    max_abs: float
    max_rel: float
    bound: float
    ok: bool


def kernel_verdict(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor, *,
                   atol: float | None = None) -> Verdict:
    """DESIGN.md rule: ``err(actual) <= RATIO * err(baseline) + atol``, errors measured against ``reference``.

    actual: the kernel's output; reference: the same computation in fp32/fp64; baseline: PyTorch's
    own computation in the kernel's dtype. ``atol`` defaults to ``ATOL[actual.dtype]``.
    """
    if actual.shape != reference.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    if atol is None:
        atol = default_atol(actual.dtype)
    a, r = flat64(actual), flat64(reference)
    diff = (a - r).abs()
    err = _max(diff)
    bound = RATIO * _max((flat64(baseline) - r).abs()) + atol
    return Verdict(err, _max(diff / r.abs().clamp_min(1e-12)), bound, err <= bound)


def exact_verdict(actual: torch.Tensor, expected: torch.Tensor) -> Verdict:
    """Bit-exact comparison (same shape, dtype and values; NaNs equal NaNs), for integer/packed outputs."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return Verdict(float("inf"), float("inf"), 0.0, False)
    same = torch.equal(actual.cpu(), expected.cpu())
    if not same and actual.is_floating_point():
        same = bool(torch.isclose(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True).all())
    return Verdict(max_abs_error(actual, expected), max_rel_error(actual, expected), 0.0, same)
