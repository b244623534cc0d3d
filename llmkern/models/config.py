"""``TransformerConfig``: every choice of the llmkern Transformer, checked once, stored as config.json."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "sinusoidal")
MLPS = ("swiglu", "gelu")


@dataclass
class TransformerConfig:
    """Shape and architecture of a :class:`~llmkern.models.Transformer`.

    The defaults give a Llama-style decoder (RMSNorm, RoPE, SwiGLU, no biases, untied head); GPT-2 style
    is ``norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True``;
    BERT style adds ``causal=False``.

    Attributes:
        vocab_size: number of token ids. dim: model width D. n_layers: transformer blocks.
        n_heads: query heads H (D must be divisible by H). n_kv_heads: key/value heads, default H
            (fewer: grouped-query attention; H must be a multiple).
        max_seq_len: longest sequence, prompt plus generated tokens (sizes learned position tables).
        hidden_dim: MLP width; default 4*D for GELU, and 8*D/3 rounded up to a multiple of 64 for SwiGLU
            (the same parameter count).
        norm: "rmsnorm" | "layernorm" (pre-norm, fused with the residual add). norm_eps: its epsilon.
        positions: "rope" (rotary, in attention) | "learned" (absolute table) | "sinusoidal" (fixed).
        rope_theta: RoPE base frequency. mlp: "swiglu" | "gelu" (tanh-free exact GELU).
        causal: decoder LM (True) or bidirectional encoder (False).
        tie_embeddings: the output head shares the token-embedding matrix.
        bias: biases in every linear layer and in LayerNorm. dropout: on embeddings, attention
            probabilities and both residual branches, in training. init_std: std of the normal init.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    max_seq_len: int = 2048
    hidden_dim: int | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    positions: str = "rope"
    rope_theta: float = 10000.0
    mlp: str = "swiglu"
    causal: bool = True
    tie_embeddings: bool = False
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self):
        name = "llmkern.models.TransformerConfig"
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"{name}: dim must be divisible by n_heads, got dim={self.dim}, n_heads={self.n_heads}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{name}: n_heads must be a multiple of n_kv_heads, got n_heads={self.n_heads}, "
                             f"n_kv_heads={self.n_kv_heads}")
        for field, allowed in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{name}: {field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"{name}: RoPE needs an even head_dim (dim / n_heads), got {self.head_dim}")
        if self.positions == "sinusoidal" and self.dim % 2:
            raise ValueError(f"{name}: sinusoidal positions need an even dim, got {self.dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.dim if self.mlp == "gelu" else 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.hidden_dim < 1:
            raise ValueError(f"{name}: hidden_dim must be positive, got {self.hidden_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"llmkern.models.TransformerConfig: unknown fields {unknown}; "
                             f"expected a subset of {sorted(known)}")
        return cls(**d)
