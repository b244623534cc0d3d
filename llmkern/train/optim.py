"""Optimizers and the learning-rate schedule of a training run."""
from __future__ import annotations

import math

import torch
from torch import nn

from llmkern.train.config import TrainConfig


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> tuple[list[dict], list[str]]:
    """Two groups: matrices (dim >= 2) with ``weight_decay``, vectors (norm weights, biases) without.

    Returns the groups and the parameter names in the optimizer's index order (group 0 then group 1),
    which is how ``optimizer.state_dict()`` numbers them.
    """
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    groups = [{"params": [p for _, p in g], "weight_decay": wd}
              for g, wd in ((decay, weight_decay), (no_decay, 0.0)) if g]
    names = [n for g in (decay, no_decay) for n, _ in g]
    return groups, names


def optimizer_class(config: TrainConfig, device: torch.device) -> tuple[type, dict]:
    """The optimizer class and its keyword arguments (without ``params``) for ``config.optimizer``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW, {"lr": config.lr, "betas": config.adam_betas, "eps": config.adam_eps}
    if config.optimizer == "sgd":
        return torch.optim.SGD, {"lr": config.lr, "momentum": config.momentum}
    if device.type != "cuda":
        raise ValueError(f"llmkern.train: optimizer='paged_adamw' needs a CUDA device (bitsandbytes pages optimizer "
                         f"state between GPU and CPU memory), got device {device}; use optimizer='adamw' on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RuntimeError("llmkern.train: optimizer='paged_adamw' needs bitsandbytes (pip install bitsandbytes)") from exc
    return bnb.optim.PagedAdamW, {"lr": config.lr, "betas": config.adam_betas, "eps": config.adam_eps}


def build_optimizer(named: list[tuple[str, nn.Parameter]], config: TrainConfig, device: torch.device,
                    zero: bool = False) -> tuple[torch.optim.Optimizer, list[str]]:
    """The optimizer over the trainable parameters ``named``; ``zero=True`` wraps it in
    ``ZeroRedundancyOptimizer`` (each process keeps the state of its share of the parameters).

    Returns the optimizer and the parameter names in its state-dict index order.
    """
    if not named:
        raise ValueError("llmkern.train: the model has no trainable parameters (every parameter has requires_grad=False)")
    cls, kwargs = optimizer_class(config, device)
    groups, names = param_groups(named, config.weight_decay)
    if not zero:
        return cls(groups, **kwargs), names
    from torch.distributed.optim import ZeroRedundancyOptimizer

    optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=cls,
                                        **{**kwargs, "weight_decay": groups[0]["weight_decay"]})
    for group in groups[1:]:
        optimizer.add_param_group(group)
    return optimizer, names


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``. Then "constant" keeps ``lr``;
    "cosine" decays as ``lr * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) / (max_steps - warmup)``.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * t))
