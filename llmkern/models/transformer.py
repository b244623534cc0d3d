"""``Transformer``: a decoder LM (GPT/Llama style) or bidirectional encoder (BERT style) built from llmkern modules."""
from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from llmkern.models import generate as _generate
from llmkern.models import serialization
from llmkern.models.block import Block, add_norm, make_norm
from llmkern.models.config import TransformerConfig
from llmkern.models.positions import LearnedPositions, SinusoidalPositions
from llmkern.nn.kv_cache import KVCache

IGNORE_INDEX = -100


class Transformer(nn.Module):
    """Token embedding, positions, ``n_layers`` pre-norm :class:`~llmkern.models.block.Block`, final norm, LM head.

    Submodules: ``embed_tokens``, ``positions`` (learned/sinusoidal only), ``layers`` (a ModuleList of
    blocks), ``norm``, ``lm_head`` (a plain ``nn.Linear``; its weight *is* ``embed_tokens.weight`` when
    ``tie_embeddings``). All linear layers are plain ``nn.Linear``, so QLoRA preparation can replace them.

    Set ``model.gradient_checkpointing = True`` to recompute each block in the backward pass
    (non-reentrant ``torch.utils.checkpoint``, RNG state preserved so dropout masks repeat).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        if config.positions == "learned":
            self.positions = LearnedPositions(config.max_seq_len, config.dim)
        elif config.positions == "sinusoidal":
            self.positions = SinusoidalPositions(config.dim)
        else:
            self.positions = None
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms; the projections that feed the residual
        stream (``o_proj``, ``down_proj``) get std / sqrt(2 * n_layers) (GPT-2)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once); optionally without token/position tables."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.embed_tokens.weight), None)
            if isinstance(self.positions, LearnedPositions):
                params.pop(id(self.positions.weight), None)
        return sum(p.numel() for p in params.values())

    def new_kv_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One empty :class:`~llmkern.nn.KVCache` per layer, for up to ``max_len`` tokens."""
        return [layer.attention.new_kv_cache(batch_size, max_len) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, kv_caches: list[KVCache] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, given labels, the mean cross-entropy loss.

        input_ids: (B, L) int64. attention_mask: (B, S + L), 1 = real token, 0 = padding, where S is
            the number of tokens already in ``kv_caches`` (0 without a cache). Padded keys are hidden
            from every query (each query still sees itself, so no row is empty); positions count real
            tokens only (cumsum of the mask), so left-padded prompts get the positions of unpadded ones.
        labels: (B, L) int64, -100 = ignored. Causal models shift inside, like Hugging Face: pass the
            tokens themselves, position t is scored on predicting ``labels[:, t + 1]``. Encoders
            (``causal=False``) score position t on ``labels[:, t]`` (masked-LM style, no shift).
            The loss is the mean over non-ignored targets (0 when there are none).
        kv_caches: from :meth:`new_kv_caches`, for incremental decoding (inference only); this call
            appends its tokens to them.
        Returns ``(logits (B, L, vocab_size) in the model's dtype, loss (float32 scalar) or None)``.
        """
        b, l = self._check_inputs(input_ids, labels, attention_mask, kv_caches)
        start = 0 if kv_caches is None else kv_caches[0].length
        if attention_mask is None or bool(attention_mask.all()):
            position_ids = torch.arange(start, start + l, device=input_ids.device)      # (L,)
            attn_mask = None
        else:
            mask = attention_mask.bool()                                               # (B, S + L)
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:]        # (B, L)
            own = (torch.arange(start + l, device=mask.device)[None, :]
                   == torch.arange(start, start + l, device=mask.device)[:, None])     # (L, S + L)
            attn_mask = mask[:, None, None, :] | own                                   # (B, 1, L, S + L)

        hidden = self.embed_tokens(input_ids)                                          # (B, L, D)
        if self.positions is not None:
            hidden = hidden + self.positions(position_ids).to(hidden.dtype)
        hidden = self.dropout(hidden)
        rope_positions = position_ids if self.config.positions == "rope" else None

        residual = None
        for i, layer in enumerate(self.layers):
            cache = None if kv_caches is None else kv_caches[i]
            if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, attn_mask, rope_positions, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, attn_mask, rope_positions, cache)
        hidden, _ = add_norm(self.norm, hidden, residual)                              # (B, L, D)
        logits = self.lm_head(hidden)                                                  # (B, L, V)
        return logits, (None if labels is None else self.loss(logits, labels))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in float32 over targets != -100, shifted by one for causal models (see forward)."""
        if self.config.causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        labels = labels.reshape(-1)
        total = F.cross_entropy(logits.reshape(labels.numel(), -1).float(), labels,
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp_min(1)

    def _check_inputs(self, input_ids, labels, attention_mask, kv_caches) -> tuple[int, int]:
        op = "llmkern.models.Transformer"
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{op}: input_ids must be a (B, L) int64 tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{op}: input_ids must be a (B, L) int64 tensor, "
                             f"got a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        start = 0 if kv_caches is None else kv_caches[0].length
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"{op}: kv_caches must hold one cache per layer ({len(self.layers)}), "
                             f"got {len(kv_caches)}")
        if start + l > self.config.max_seq_len:
            raise ValueError(f"{op}: {start + l} tokens exceed max_seq_len {self.config.max_seq_len}")
        if labels is not None and tuple(labels.shape) != (b, l):
            raise ValueError(f"{op}: labels must have the shape of input_ids {(b, l)}, got {tuple(labels.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, start + l):
            raise ValueError(f"{op}: attention_mask must have shape (B, cached + L) = {(b, start + l)}, "
                             f"got {tuple(attention_mask.shape)}")
        return b, l

    generate = _generate.generate

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``path/config.json`` and ``path/model.safetensors`` (no pickle)."""
        serialization.save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "Transformer":
        """Load a model written by :meth:`save_pretrained`, weights in the dtype they were saved in."""
        return serialization.from_pretrained(cls, path, device)
