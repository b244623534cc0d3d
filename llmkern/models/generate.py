"""Autoregressive generation for causal :class:`~llmkern.models.Transformer` models: greedy or sampled, KV-cached."""
from __future__ import annotations

import torch


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V): argmax when ``temperature == 0``, else a sample of
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and then to the
    smallest set whose probability reaches ``top_p`` (nucleus). Returns (B,) int64."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)            # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p        # the mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check(model, input_ids, max_new_tokens, temperature, top_k, top_p) -> None:
    op = "llmkern.models.Transformer.generate"
    if not model.config.causal:
        raise ValueError(f"{op}: generation needs a causal model, got causal=False")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{op}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0.0:
        raise ValueError(f"{op}: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{op}: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{op}: top_p must be in (0, 1] or None, got {top_p}")
    total = input_ids.shape[-1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"{op}: prompt length {input_ids.shape[-1]} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds max_seq_len {model.config.max_seq_len}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``input_ids`` (B, L) by up to ``max_new_tokens`` tokens; returns (B, L + n) int64.

    ``temperature=0`` is greedy decoding; otherwise tokens are sampled (see :func:`sample_next_token`)
    with ``generator`` as the random source. Prompts of different lengths go left-padded with an
    ``attention_mask`` (B, L) (1 = real token). A row that produced ``eos_token_id`` is filled with it
    from then on; generation stops early when every row has. With ``use_cache`` (the default) each
    step feeds only the new token through the model and reads earlier keys/values from a KV cache;
    without, each step recomputes the whole sequence (same tokens, slower). The model runs in eval
    mode (dropout off) and is put back in its previous mode afterwards.
    """
    _check(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    b, l = input_ids.shape
    was_training = model.training
    model.eval()
    try:
        caches = model.new_kv_caches(b, l + max_new_tokens) if use_cache else None
        tokens, step_input, mask = input_ids, input_ids, attention_mask
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits, _ = model(step_input if use_cache else tokens, attention_mask=mask, kv_caches=caches)
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done, eos_token_id)
                done = done | (next_token == eos_token_id)
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)
            step_input = next_token[:, None]
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(b, 1)), dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return tokens
    finally:
        model.train(was_training)
