"""Absolute position information added to the token embeddings: learned table or fixed sinusoids.

(Rotary positions live in the attention layers instead: :class:`llmkern.nn.RotaryEmbedding`.)
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017): ``pe[p, 2i] = sin(p / 10000**(2i/dim))``, ``pe[p, 2i+1] = cos(...)``.

    positions: integer tensor of any shape; returns float32 ``positions.shape + (dim,)``. Computed per
    call (no table), so it holds at any position and in any model dtype.
    """
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                         * (-math.log(10000.0) / dim))                      # (dim/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq              # (..., dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)    # (..., dim) interleaved sin/cos


class LearnedPositions(nn.Module):
    """A learned (max_seq_len, dim) table, as in GPT-2 and BERT; ``forward(positions) -> (..., dim)``."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(positions, self.weight)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoids (no parameters); ``forward(positions) -> (..., dim)`` in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(positions, self.dim)
