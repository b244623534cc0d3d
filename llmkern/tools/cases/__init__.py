"""What ``llmkern check`` runs: one declarative entry per op, one module per op family.

Two kinds of entry:

:class:`KernelCase`
    A floating-point op checked with the DESIGN.md rule, forward and backward: llmkern's result
    (in the case's dtype, on the backend under test) against the PyTorch computation ``torch`` run on
    float64 copies of the inputs (the reference), with PyTorch's same-dtype run of ``torch`` as the
    baseline whose error sets the tolerance.
:class:`ExactCase`
    An op whose result is fixed bit for bit (quantization codes, packed bytes, scales): each named
    output on the backend under test must equal the same call on the ``reference`` backend.

A family module (``llmkern/tools/cases/<family>.py``) defines ``cases() -> list`` and, where it
has one, ``quantization_error(device) -> list[dict]``; adding a family is adding such a module and
its name to :data:`FAMILIES`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# The family modules of this package, in the order the tools report them.
FAMILIES = ("norm", "attention", "nf4", "lora")


@dataclass(frozen=True)
class KernelCase:
    """A floating-point op, checked forward and backward with the 2x-torch rule.

    op: the name printed (the public function, e.g. ``"rms_norm"``).
    dispatch: the registered backend op its forward runs through (``"norm_fwd"``); a backend that
        has no implementation of it is reported as SKIP for this case.
    shapes: parameter dicts, the standard sizes first, then odd ones; each is passed to ``inputs``
        and printed as ``k=v`` (tuples as ``4x1024``).
    inputs: ``(dtype, device, **shape) -> dict`` of the keyword arguments of ``llmkern`` and ``torch``
        (tensors and plain values); only floating tensors are upcast for the reference.
    llmkern: the llmkern call; returns a tensor or a tuple of tensors named by ``outputs``.
    torch: the same computation written with PyTorch, run in float64 (reference) and in the
        case's dtype (baseline).
    grads: the inputs whose gradients the backward check compares (none: forward only).
    dot: the kernels use ``tl.dot``; bf16 is not run in the Triton interpreter, which computes
        bf16 dot products wrongly.
    """

    op: str
    dispatch: str
    shapes: tuple[dict, ...]
    inputs: Callable[..., dict]
    llmkern: Callable[..., object]
    torch: Callable[..., object]
    outputs: tuple[str, ...] = ("out",)
    grads: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FLOATS
    dot: bool = False


@dataclass(frozen=True)
class ExactCase:
    """An op whose outputs must be bit-identical to an expectation.

    inputs: ``(dtype, device, **shape) -> dict`` of keyword arguments of ``llmkern``.
    llmkern: the call; returns ``{name: tensor}`` of every output that is compared.
    expected: an independent implementation (e.g. bitsandbytes) taking the same arguments and
        returning the same names, or None when it is not installed. Where it gives a result, every
        backend (the reference too) must match it; otherwise each backend must match the call on
        the ``reference`` backend, and the reference itself is not checked.
    Other fields as :class:`KernelCase`.
    """

    op: str
    dispatch: str
    shapes: tuple[dict, ...]
    inputs: Callable[..., dict]
    llmkern: Callable[..., dict]
    expected: Callable[..., dict | None] | None = None
    dtypes: tuple[torch.dtype, ...] = FLOATS
    dot: bool = False


@dataclass
class Family:
    """An op family as the tools see it: its module and its cases."""

    name: str
    module: object
    cases: list = field(default_factory=list)


def families(names: list[str] | None = None) -> list[Family]:
    """The op families (all, or those named), each with its cases."""
    found = []
    for name in FAMILIES:
        if names and name not in names:
            continue
        module = importlib.import_module(f"llmkern.tools.cases.{name}")
        found.append(Family(name, module, module.cases()))
    return found


def shape_label(shape: dict) -> str:
    """``{"x": (4, 1024), "causal": True}`` -> ``"x=4x1024 causal=True"``."""
    parts = []
    for key, value in shape.items():
        if isinstance(value, (tuple, list)):
            value = "x".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return " ".join(parts)
