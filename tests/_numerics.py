"""The numerics rule of DESIGN.md, in one place (the rule itself lives in ``llmkern.tools.numerics``,
shared with ``llmkern check``; this module turns it into test assertions).

A kernel's error against a high-precision reference must be at most ``RATIO`` (2x) the error of
PyTorch's own same-dtype computation against that reference, plus a small per-dtype ``atol``.
Errors are max-abs; failure messages give max abs/rel error and the index where each occurred.
"""
from __future__ import annotations

import torch

from llmkern.tools.numerics import ATOL, RATIO, default_atol, error_report, flat64, max_abs_error

__all__ = ["ATOL", "RATIO", "assert_close", "assert_kernel_close", "error_report", "max_abs_error"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """Plain closeness ``|a - e| <= atol + rtol * |e|`` with a report of where it fails."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = flat64(actual), flat64(expected)
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
        atol = default_atol(actual.dtype)
    err = max_abs_error(actual, reference)
    base = max_abs_error(baseline, reference)
    bound = RATIO * base + atol
    if not err <= bound:
        raise AssertionError(
            f"{name}: error {err:.3e} exceeds {RATIO:g} x torch's {base:.3e} + atol {atol:.1e} = {bound:.3e}; "
            f"{error_report(actual, reference)}")
