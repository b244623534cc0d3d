"""Mixed precision: autocast regions and dynamic loss scaling for fp16.

Parameters, gradients and optimizer state keep the parameters' dtype (fp32 master state); only the
forward runs under ``torch.autocast``. fp16 needs loss scaling: the loss is multiplied by ``scale``
before ``backward`` so small gradients do not flush to zero, the gradients are divided by it before
the optimizer step, and a step whose gradients are not finite is skipped while the scale halves.
"""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(mixed_precision: str, device: torch.device):
    """``torch.autocast`` for "bf16"/"fp16" on ``device``; a null context for "no"."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


class LossScaler:
    """Dynamic loss scale (the policy of ``torch.amp.GradScaler``): start at ``init_scale``, halve on a
    step with non-finite gradients, double after ``growth_interval`` finite steps in a row.

    The skip decision is taken by the caller from the global gradient norm, so every process of a
    sharded (FSDP) run decides the same way. ``enabled=False`` makes every method a no-op (scale 1).
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """Divide ``grads`` in place by the current scale."""
        if self.enabled and grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
