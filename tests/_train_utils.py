"""A tiny pure-PyTorch causal LM and synthetic datasets for the trainer, checkpoint, memory and distributed tests.

The model uses only torch ops, so these tests do not depend on any llmkern kernel or backend.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Autouse in the modules that import it. These models are tiny: one intra-op thread is faster than
    several (far faster on a busy machine, where OpenMP threads wait on each other). Restores the
    thread count after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, l, d)
        x = x + self.dropout(self.proj(attn))
        return x + self.dropout(self.down(F.gelu(self.up(self.norm2(x)))))


class TinyLM(nn.Module):
    """Causal LM (B, L) ids -> (B, L, V) logits. Right padding does not change the logits of real tokens
    (causal attention), so ``attention_mask`` is accepted and not needed. ``output`` picks the return
    kind: "tuple" ``(logits, None)``, "object" (``.logits``) or "tensor"."""

    def __init__(self, vocab: int = 37, dim: int = 32, layers: int = 2, heads: int = 4, dropout: float = 0.0,
                 output: str = "tuple"):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.gradient_checkpointing = False
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        logits = self.lm_head(self.norm(x))
        if self.output == "object":
            return type("Output", (), {"logits": logits})()
        return logits if self.output == "tensor" else (logits, None)


def make_dataset(n: int, vocab: int = 37, min_len: int = 3, max_len: int = 12, seed: int = 0,
                 prompt_mask: bool = True) -> list[dict]:
    """``n`` items of random length; with ``prompt_mask`` the first tokens' labels are -100, so the
    number of targets differs from item to item."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = ids.clone()
        if prompt_mask:
            labels[: int(torch.randint(0, length - 1, (1,), generator=g))] = -100
        items.append({"input_ids": ids, "labels": labels})
    return items


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tiny_model(seed: int = 0, **kwargs) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kwargs)
