"""``LayerNorm`` / ``RMSNorm``: subclasses of torch's modules whose forward runs llmkern's kernels."""
from __future__ import annotations

import torch

from llmkern import ops


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the same constructor and state_dict, forward through :func:`llmkern.ops.layer_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with the same constructor and state_dict, forward through :func:`llmkern.ops.rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)
