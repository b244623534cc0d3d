"""Input checks shared by the ops: every message names the op, the argument, what was expected and what came."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, t, *, dtypes=None, ndim=None, min_ndim=None, shape=None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``t`` is a tensor of an allowed dtype, rank and shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"llmkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"llmkern.{op}: {name} must have dtype in ({_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"llmkern.{op}: {name} must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"llmkern.{op}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"llmkern.{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(op: str, **tensors) -> None:
    """Raise ``ValueError`` if the given (non-None) tensors are not all on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"llmkern.{op}: all tensors must be on one device, got {where}")


def rows_2d(x: torch.Tensor, n: int) -> torch.Tensor:
    """View ``x`` (..., n) as (M, n) rows; copies only when the last dim is not contiguous or rows cannot be viewed."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, n)
    except RuntimeError:
        return x.reshape(-1, n).contiguous()
