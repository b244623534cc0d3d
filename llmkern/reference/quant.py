"""Reference int8 block quantization: symmetric absmax and asymmetric zero-point schemes.

The two textbook 8-bit schemes, per block of ``blocksize`` consecutive elements of the flattened
tensor (the last block may be partial), computed in float32 (fp16/bf16 inputs widen exactly), so
that their error can be compared with NF4's:

absmax (symmetric, int8)
    ``scale = absmax / 127``, ``q = clamp(rint(x * (127 / absmax)), -127, 127)``;
    dequantized ``q * scale``. A block with ``absmax == 0`` gets ``q = 0``, ``scale = 0``.
zero-point (asymmetric, uint8)
    ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` (the range always holds 0, so 0 is exact),
    ``scale = (hi - lo) / 255``, ``zero = clamp(rint(-lo * (255 / (hi - lo))), 0, 255)``,
    ``q = clamp(rint(x * (255 / (hi - lo))) + zero, 0, 255)``; dequantized ``(q - zero) * scale``.
    A block with ``hi == lo`` (all zeros) gets ``q = 0``, ``zero = 0``, ``scale = 0``.

``rint`` rounds half to even; every division is a correctly rounded float32 division.

Backend contract (1-D, contiguous):
``int8_quantize(x, blocksize, symmetric) -> (q, scale, zero)``: q (n,) int8 (symmetric) or uint8;
scale (nblocks,) float32; zero (nblocks,) uint8 (empty when symmetric).
``int8_dequantize(q, scale, zero, blocksize, symmetric, dtype) -> (n,) dtype``.
"""
from __future__ import annotations

import torch


def _blocks(x: torch.Tensor, blocksize: int, fill: float = 0.0) -> torch.Tensor:
    n = x.numel()
    nb = -(-n // blocksize)
    out = torch.full((nb * blocksize,), fill, dtype=torch.float32, device=x.device)
    out[:n] = x.reshape(-1).float()
    return out.view(nb, blocksize)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """Correctly rounded float32 ``a / b`` elementwise (``a`` or ``b`` may be a Python number; torch
    would turn ``number / tensor`` into a reciprocal and a multiply)."""
    a = a if isinstance(a, torch.Tensor) else torch.full_like(b, a)
    b = b if isinstance(b, torch.Tensor) else torch.full_like(a, b)
    return torch.div(a, b)


def int8_quantize(x: torch.Tensor, blocksize: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.numel()
    b = _blocks(x, blocksize)  # padding with 0 changes neither absmax nor (lo, hi): the range holds 0
    if symmetric:
        absmax = b.abs().amax(dim=1)
        inv = torch.where(absmax == 0, torch.zeros_like(absmax), _div(127.0, absmax))
        q = torch.round(b * inv[:, None]).clamp(-127, 127).to(torch.int8)
        return q.reshape(-1)[:n].contiguous(), _div(absmax, 127.0), x.new_empty(0, dtype=torch.uint8)
    lo = b.amin(dim=1).clamp(max=0)
    hi = b.amax(dim=1).clamp(min=0)
    span = hi - lo
    inv = torch.where(span == 0, torch.zeros_like(span), _div(255.0, span))
    zero = torch.round(-lo * inv).clamp(0, 255)
    q = (torch.round(b * inv[:, None]) + zero[:, None]).clamp(0, 255).to(torch.uint8)
    return q.reshape(-1)[:n].contiguous(), _div(span, 255.0), zero.to(torch.uint8)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, blocksize: int, symmetric: bool,
                    dtype: torch.dtype) -> torch.Tensor:
    n = q.numel()
    values = q.reshape(-1).float()
    if not symmetric:
        values = values - zero.float().repeat_interleave(blocksize)[:n]
    return (values * scale.repeat_interleave(blocksize)[:n]).to(dtype)
