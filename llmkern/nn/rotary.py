"""Rotary position embedding (RoPE, Su et al. 2021) in the Llama / GPT-NeoX layout.

The head dimension is split in two halves ``(x1, x2)``; the pair ``(x1[i], x2[i])`` is rotated by the
angle ``position * theta ** (-2i / head_dim)``. This is the layout of Hugging Face's Llama
(``rotate_half``), so Llama-family weights work unchanged.
"""
from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the rotation angles, float32, shape ``positions.shape + (head_dim,)``.

    positions: integer tensor of absolute token positions, e.g. (L,) or (B, L).
    Computed from the positions on every call (no cached table), so precision does not depend on the
    module's dtype and any position works.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)                                # (E/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq          # (..., E/2)
    angles = torch.cat((angles, angles), dim=-1)                        # (..., E)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, L, E) by angles ``cos``/``sin`` of shape (L, E) or (B, L, E); fp32 math, x's dtype out."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]                           # (B, 1, L, E)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to queries and keys: ``rope(q, k, positions) -> (q, k)``; no parameters, no buffers.

    head_dim: even size of one attention head. theta: the base of the angle frequencies (10000 in
    Llama 1/2, 500000 in Llama 3).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"llmkern.nn.RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, H, L, E), k: (B, H_kv, L, E), positions: (L,) or (B, L) integers."""
        cos, sin = rope_angles(positions, self.head_dim, self.theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}"
