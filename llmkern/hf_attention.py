"""The ``"llmkern"`` attention implementation for Hugging Face transformers.

After :func:`register` (which :func:`llmkern.swap_modules` calls), ``model.set_attn_implementation("llmkern")``
or ``AutoModel.from_pretrained(..., attn_implementation="llmkern")`` runs the attention of every model
written against transformers' ``AttentionInterface`` (Llama, Mistral, Qwen2, Gemma, GPT-2, BERT, ...)
through :func:`llmkern.ops.scaled_dot_product_attention`. Masks are built exactly as for ``"sdpa"``
(boolean, True = attend, or None when the causal flag alone describes them), so padding, sliding
windows and KV caches behave as with ``"sdpa"``.
"""
from __future__ import annotations

import torch

from llmkern import ops

NAME = "llmkern"
_UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (as its ``sdpa_attention_forward``).

    query: (B, H, L_q, E); key, value: (B, H_kv, L_k, E) with H a multiple of H_kv (grouped-query
    attention runs without repeating keys/values); attention_mask: None, or boolean/additive
    broadcastable to (B, H, L_q, L_k). ``is_causal`` (default ``module.is_causal``) applies only
    when there is no mask and L_q > 1, as in ``"sdpa"``. Returns ``((B, L_q, H, E), None)``: no
    attention weights. Attention-logit soft-capping, attention sinks and position biases are not
    supported and raise ``ValueError``.
    """
    for option in _UNSUPPORTED:
        if kwargs.get(option) is not None:
            raise ValueError(f"llmkern attention for transformers: {type(module).__name__} passes `{option}`, which "
                             f"llmkern.ops.scaled_dot_product_attention does not support; use "
                             f"attn_implementation='sdpa' or 'eager' for this model")
    l_q = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal) and attention_mask is None and l_q > 1
    if is_causal and key.shape[2] > l_q:
        # Prefill of an empty static cache: the keys past L_q are unwritten and causally hidden anyway.
        key, value = key[:, :, :l_q], value[:, :, :l_q]
    out = ops.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1])                                    # (B, H, L_q, E)
    return out.transpose(1, 2).contiguous(), None


def register() -> bool:
    """Register ``"llmkern"`` with transformers' attention and attention-mask interfaces.

    Returns False when transformers is not installed. Raises ``RuntimeError`` when it is too old to
    have ``AttentionMaskInterface`` (without it a custom implementation would get no masks).
    """
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise RuntimeError("llmkern attention for transformers needs transformers.masking_utils.AttentionMaskInterface "
                           "(transformers >= 4.53); upgrade transformers or pass attention=False") from exc
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True
