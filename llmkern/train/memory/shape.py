"""What the memory estimator reads from a model: its shape, its tensors, its adapters, its checkpointing."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a decoder transformer.

    ``style``: "llmkern" (fused add+norm saving only its input and 1/rms, checkpointing that keeps
    hidden and residual per layer) or "hf" (Hugging Face Llama-style modules).
    ``mlp``: "swiglu" (gate/up/down) or "gelu" (up/down).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    mlp: str = "swiglu"
    tie_embeddings: bool = False
    style: str = "llmkern"

    @property
    def kv_dim(self) -> int:
        return self.dim // self.n_heads * self.n_kv_heads

    def layer_linears(self) -> list[tuple[int, int]]:
        """``(in_features, out_features)`` of the linear layers of one block."""
        d, k, f = self.dim, self.kv_dim, self.hidden_dim
        mlp = [(d, f), (d, f), (f, d)] if self.mlp == "swiglu" else [(d, f), (f, d)]
        return [(d, d), (d, k), (d, k), (d, d)] + mlp

    def num_parameters(self) -> int:
        """Parameters of the dense model (no biases): embeddings, blocks, norms, head."""
        per_layer = sum(i * o for i, o in self.layer_linears()) + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a :class:`llmkern.models.TransformerConfig` or a Hugging Face Llama-style config."""
        if hasattr(config, "n_layers") and hasattr(config, "dim"):
            return cls(config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads,
                       config.hidden_dim, config.mlp, config.tie_embeddings, "llmkern")
        needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in needed if not hasattr(config, k)]
        if missing:
            raise ValueError(f"llmkern.train.memory.ModelShape.from_config: config lacks {missing}; expected an "
                             f"llmkern TransformerConfig or a Llama-style Hugging Face config, got {type(config).__name__}")
        act = getattr(config, "hidden_act", "silu")
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   config.intermediate_size, "swiglu" if act in ("silu", "swish") else "gelu",
                   bool(getattr(config, "tie_word_embeddings", False)), "hf")

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelShape | None":
        """From ``model.config`` when it is one of the configs above, else ``None``."""
        config = getattr(model, "config", None)
        if config is None:
            return None
        try:
            return cls.from_config(config)
        except ValueError:
            return None


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether an llmkern ``Transformer`` or a Hugging Face model has activation checkpointing on."""
    for attr in ("gradient_checkpointing", "is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or attr in vars(model):
            return bool(getattr(model, attr))
    return False


def _quant_state_tensors(state) -> list[torch.Tensor]:
    out = []
    while state is not None:
        out += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    return out


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a model holds: parameters, buffers and NF4 quantization states."""
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if hasattr(m, "quant_state"):
            tensors += _quant_state_tensors(m.quant_state)
    return tensors


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``; a sharded (DTensor) parameter counts whole."""
    seen, total = set(), 0
    for t in tensors:
        if hasattr(t, "to_local"):
            total += t.numel() * t.element_size()
            continue
        st = t.untyped_storage()
        key = id(st)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


@dataclass(frozen=True)
class Adapters:
    """What LoRA looks like inside one block: how many linears carry adapters, their rank, and the
    dtype an NF4 base computes in (None: the input's)."""

    count: int
    r: int
    compute_dtype: torch.dtype | None


def adapters_of(model: nn.Module) -> Adapters | None:
    from llmkern.nn import LinearNF4, LoRALinear

    layers = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    block = max(layers, key=len)[0] if layers else model
    lora = [m for m in block.modules() if isinstance(m, LoRALinear)]
    if not lora:
        return None
    base = lora[0].base_layer
    return Adapters(len(lora), lora[0].r, base.compute_dtype if isinstance(base, LinearNF4) else None)
