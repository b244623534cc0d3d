"""The analytic peak-memory estimate of a training step (see :mod:`llmkern.train.memory`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from llmkern.qlora import is_norm
from llmkern.train.memory.measure import format_bytes
from llmkern.train.memory.shape import (Adapters, ModelShape, adapters_of, gradient_checkpointing_enabled,
                                        model_tensors, storage_bytes)
from llmkern.train.precision import AUTOCAST_DTYPES

METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one process, by component (bytes); ``total`` is the peak."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int | None
    transient: int | None
    phase: str

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + (self.activations or 0) + (self.transient or 0)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}

    def __str__(self) -> str:
        parts = [f"parameters {format_bytes(self.parameters)}", f"gradients {format_bytes(self.gradients)}",
                 f"optimizer {format_bytes(self.optimizer)}"]
        if self.activations is None:
            parts.append("activations unknown (no ModelShape for this model)")
        else:
            parts += [f"activations {format_bytes(self.activations)}", f"transient {format_bytes(self.transient)}"]
        return f"{format_bytes(self.total)} at {self.phase} ({', '.join(parts)})"


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _layer_activation_bytes(shape: ModelShape, e: int, c: int, autocast: bool, trainable_norms: bool,
                            adapters: Adapters | None) -> int:
    """Bytes per token that one block saves for its backward (see the module docstring's table)."""
    d, k, f, h = shape.dim, shape.kv_dim, shape.hidden_dim, shape.n_heads
    n_mlp_in = 2 if shape.mlp == "swiglu" else 1
    norms = 2 * (d * e + 4) + (2 * d * e if shape.style == "hf" and trainable_norms else 0)
    if adapters is not None and adapters.compute_dtype is not None and _dtype_bytes(adapters.compute_dtype) != e:
        autocast, c = True, _dtype_bytes(adapters.compute_dtype)
    inputs = (3 + n_mlp_in) * d * c if autocast else 2 * d * e
    attention = (2 * d + 2 * k) * c + 4 * h
    mlp = (4 if shape.mlp == "swiglu" else 2) * f * c
    lora = adapters.count * adapters.r * 4 if adapters is not None else 0
    return norms + inputs + attention + mlp + lora


def _optimizer_bytes(optimizer: str, n_trainable: int, state_bytes: int, momentum: float) -> int:
    if optimizer in ("adamw", "paged_adamw"):
        return 2 * n_trainable * state_bytes
    return n_trainable * state_bytes if momentum else 0


@dataclass(frozen=True)
class _Setup:
    """The model-state side of an estimate, read from a model or derived from a shape."""

    params_bytes: int
    n_trainable: int
    trainable_bytes: int
    largest_trainable: int          # bytes of the largest trainable tensor
    layer_grad_bytes: int           # gradient bytes of one block
    head_grad_bytes: int            # gradient bytes of the LM head (0 when frozen or tied)
    elem: int                       # bytes per element of the parameters / residual stream
    adapters: Adapters | None
    trainable_norms: bool
    checkpointing: bool
    device: torch.device


def _setup_from_shape(shape: ModelShape, method: str, lora_r: int, param_dtype: torch.dtype,
                      checkpointing: bool, device) -> _Setup:
    if method not in METHODS:
        raise ValueError(f"llmkern.train.memory.estimate: method must be one of {METHODS}, got {method!r}")
    e = _dtype_bytes(param_dtype)
    linears = shape.layer_linears()
    n_linear = shape.n_layers * sum(i * o for i, o in linears)
    n_all = shape.num_parameters()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if method == "full":
        head = 0 if shape.tie_embeddings else shape.vocab_size * shape.dim * e
        return _Setup(n_all * e, n_all, n_all * e, shape.vocab_size * shape.dim * e,
                      (sum(i * o for i, o in linears) + 2 * shape.dim) * e, head, e, None, True, checkpointing, dev)
    n_lora_layer = sum(lora_r * (i + o) for i, o in linears)
    # NF4: 4 bits per weight, one 8-bit absmax code per 64 weights, one fp32 scale per 256 codes.
    base = n_linear * (0.5 + 1 / 64 + 4 / (64 * 256)) if method == "qlora" else n_linear * e
    params = int(base + (n_all - n_linear) * e + shape.n_layers * n_lora_layer * 4)
    n_lora = shape.n_layers * n_lora_layer
    adapters = Adapters(len(linears), lora_r, None)
    return _Setup(params, n_lora, n_lora * 4, lora_r * max(max(i, o) for i, o in linears) * 4,
                  n_lora_layer * 4, 0, e, adapters, False, checkpointing, dev)


def _setup_from_model(model: nn.Module, checkpointing: bool | None, device) -> _Setup:
    trainable = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() * p.element_size() for p in trainable]
    first = next(model.parameters(), None)
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if checkpointing is None:
        checkpointing = gradient_checkpointing_enabled(model)
    norms = [m for m in model.modules() if is_norm(m)]
    head = getattr(model, "lm_head", None)
    head_grad = sum(p.numel() * p.element_size() for p in head.parameters() if p.requires_grad) if head is not None else 0
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    block = max(lists, key=len)[0] if lists else None
    layer_grad = sum(p.numel() * p.element_size() for p in block.parameters() if p.requires_grad) if block is not None else 0
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    return _Setup(storage_bytes(model_tensors(model)), sum(p.numel() for p in trainable), sum(sizes),
                  max(sizes, default=0), layer_grad, head_grad, _dtype_bytes(floating), adapters_of(model),
                  any(p.requires_grad for m in norms for p in m.parameters()), checkpointing, dev)


def estimate(model: nn.Module | ModelShape, *, batch_size: int, seq_len: int, method: str = "full",
             lora_r: int = 16, param_dtype: torch.dtype = torch.float32, mixed_precision: str = "no",
             optimizer: str = "adamw", momentum: float = 0.0, gradient_checkpointing: bool | None = None,
             grad_accum_steps: int = 1, world_size: int = 1, zero: int = 0, fsdp: bool = False,
             device: torch.device | str | None = None) -> MemoryEstimate:
    """Estimate the peak memory of one training process (see the module docstring for the model).

    Args:
        model: a model instance (parameters, trainable set, LoRA/NF4 layers, checkpointing and device
            are read from it) or a :class:`ModelShape` (then ``method``, ``lora_r``, ``param_dtype``,
            ``gradient_checkpointing`` and ``device`` describe the setup: "full" trains everything,
            "lora" adds rank-``lora_r`` fp32 adapters to every block linear over a frozen
            ``param_dtype`` base, "qlora" does so over an NF4 base with double quantization, blocksize 64).
        batch_size, seq_len: one micro-batch.
        mixed_precision: "no" | "bf16" | "fp16" (autocast; parameters keep their dtype).
        optimizer: "adamw" | "paged_adamw" | "sgd" (with ``momentum``).
        grad_accum_steps: > 1 keeps every gradient alive during the later micro-batches.
        world_size, zero, fsdp: ZeRO-1 shards optimizer state, FSDP parameters, gradients and state.
        device: where training runs; CUDA optimizers update all tensors at once (foreach), CPU ones
            one tensor at a time, which changes the optimizer's temporaries.
    Returns: a :class:`MemoryEstimate`; its activations are ``None`` for a model without a
        :class:`ModelShape` (only the model states are estimated then).
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"llmkern.train.memory.estimate: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"llmkern.train.memory.estimate: mixed_precision must be 'no', 'bf16' or 'fp16', "
                         f"got {mixed_precision!r}")
    if optimizer not in ("adamw", "paged_adamw", "sgd"):
        raise ValueError(f"llmkern.train.memory.estimate: optimizer must be 'adamw', 'paged_adamw' or 'sgd', "
                         f"got {optimizer!r}")
    if isinstance(model, ModelShape):
        shape = model
        setup = _setup_from_shape(shape, method, lora_r, param_dtype, bool(gradient_checkpointing), device)
    else:
        shape = ModelShape.from_model(model)
        setup = _setup_from_model(model, gradient_checkpointing, device)

    shard = world_size if fsdp else 1
    params = setup.params_bytes // shard
    grads = setup.trainable_bytes // shard
    state_elem = setup.trainable_bytes // max(setup.n_trainable, 1)
    opt = _optimizer_bytes(optimizer, setup.n_trainable, state_elem, momentum) // (world_size if zero or fsdp else 1)
    if optimizer == "sgd":
        opt_tmp = 0
    elif setup.device.type == "cuda":      # foreach: a temporary for every tensor at once
        opt_tmp = grads
    else:                                  # one tensor at a time: sqrt(v) and its scaled copy
        opt_tmp = 2 * setup.largest_trainable
    phases = {"optimizer step": (grads, 0, opt_tmp)}
    if shape is not None:
        phases.update(_activation_phases(shape, setup, batch_size, seq_len, mixed_precision, grads, grad_accum_steps))
    phase = max(phases, key=lambda k: sum(phases[k]))
    alive, activations, transient = phases[phase]
    if shape is None:
        return MemoryEstimate(params, alive, opt, None, None, phase)
    return MemoryEstimate(params, alive, opt, activations, transient, phase)


def _activation_phases(shape: ModelShape, setup: _Setup, batch_size: int, seq_len: int, mixed_precision: str,
                       grads: int, grad_accum_steps: int) -> dict[str, tuple[int, int]]:
    """Per phase of a step: ``(gradient bytes alive, saved activation bytes, other short-lived bytes)``."""
    e = setup.elem
    autocast = mixed_precision != "no"
    c = _dtype_bytes(AUTOCAST_DTYPES[mixed_precision]) if autocast else e
    t = batch_size * seq_len
    d, v, head_dim = shape.dim, shape.vocab_size, shape.dim // shape.n_heads
    rope = 2 * seq_len * head_dim * 4                       # cos and sin, fp32
    llmkern = shape.style == "llmkern"
    layer = _layer_activation_bytes(shape, e, c, autocast, setup.trainable_norms, setup.adapters) * t
    layer += rope if llmkern else 0
    layer_inputs = (2 if llmkern else 1) * d * e * t
    fixed = (8 + 2 * d * e + 4) * t + (0 if llmkern else rope + (d * e * t if setup.trainable_norms else 0))
    # Autocast keeps a compute-dtype copy of every linear weight until that layer's backward
    # (a checkpointed layer makes its copies again when it is recomputed).
    layer_copies = sum(i * o for i, o in shape.layer_linears()) * c if autocast else 0
    head_copy = v * d * c if autocast else 0
    layer += layer_copies
    if setup.checkpointing:
        stored = shape.n_layers * layer_inputs + fixed + head_copy
        bottom = fixed + layer_inputs + layer
    else:
        stored = shape.n_layers * layer + fixed + head_copy
        bottom = fixed + layer
    recompute = layer if setup.checkpointing else 0
    flow = t * (2 * d + shape.hidden_dim) * c               # gradients travelling through a block
    upcast = 4 * t * v if c != 4 else 0                     # fp32 copy of low-precision logits
    # With accumulation the micro-batches after the first run with every gradient allocated;
    # without, gradients appear layer by layer as the backward goes down.
    if grad_accum_steps > 1:
        head = top = low = grads
    else:
        head = setup.head_grad_bytes
        top = head
        low = min(grads, head + (shape.n_layers - 1) * setup.layer_grad_bytes)
    return {
        "loss forward": (0 if grad_accum_steps == 1 else grads, stored, t * v * c + upcast + 4 * t * v),
        "loss backward": (0 if grad_accum_steps == 1 else grads, stored, 3 * 4 * t * v),
        "LM-head backward": (head, stored, 4 * t * v + t * d * c),
        "top layer backward": (top, stored, recompute + flow),
        "bottom layer backward": (low, bottom, flow),
    }
