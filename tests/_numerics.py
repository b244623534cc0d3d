"""The numerics rule of DESIGN.md, in one place.

A kernel's error against a high-precision reference must be at most ``RATIO`` (2x) the error of
PyTorch's own same-dtype computation against that reference, plus a small per-dtype ``atol``.
Errors are max-abs; failure messages give max abs/rel error and the index where each occurred.
"""
from __future__ import annotations

import torch

RATIO = 2.0

# Slack added to the 2x rule: covers rounding of the output itself (one ulp at |y| ~ 1-4).
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).reshape(-1)


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """``max abs err E at index I (got a, want b); max rel err R at index J``."""
    a, e = _flat(actual), _flat(expected)
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


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = _flat(actual), _flat(expected)
    if a.numel() == 0:
        return 0.0
    return float(torch.nan_to_num((a - e).abs(), nan=float("inf")).max())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """Plain closeness ``|a - e| <= atol + rtol * |e|`` with a report of where it fails."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = _flat(actual), _flat(expected)
    ok = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if not bool(ok.all()):
        raise AssertionError(f"{name}: not within atol={atol:g}, rtol={rtol:g}: {error_report(actual, expected)}")


def assert_kernel_close(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor, *,
                        name: str = "", atol: float | None = None) -> None:
    """DESIGN.md rule: ``err(actual) <= 2 * err(baseline) + atol`` with errors measured against ``reference``.

    actual: the kernel's output; reference: the same computation in fp32/fp64; baseline: PyTorch's
    own computation in the kernel's dtype. ``atol`` defaults to ``ATOL[actual.dtype]``.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    if atol is None:
        atol = ATOL.get(actual.dtype, ATOL[torch.float32])
    err = max_abs_error(actual, reference)
    base = max_abs_error(baseline, reference)
    bound = RATIO * base + atol
    if not err <= bound:
        raise AssertionError(
            f"{name}: error {err:.3e} exceeds {RATIO:g} x torch's {base:.3e} + atol {atol:.1e} = {bound:.3e}; "
            f"{error_report(actual, reference)}")
