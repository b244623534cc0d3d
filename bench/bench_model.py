"""Whole models: training (forward+backward) and forward tokens/s with and without llmkern modules.

    python -m pytest bench/bench_model.py --benchmark-only --benchmark-group-by=param:model,param:mode

Models, all the same small Llama shape (RMSNorm, RoPE, SwiGLU, grouped-query attention):

* ``hf-llama``: Hugging Face ``LlamaForCausalLM`` from a random config. Providers: ``torch`` (as built,
  ``sdpa`` attention and HF's RMSNorm) and ``llmkern`` (the same weights after
  :func:`llmkern.swap_modules`: llmkern norms and ``"llmkern"`` attention).
* ``transformer``: :class:`llmkern.models.Transformer`. Providers: ``llmkern`` (its ops on the default
  backend: Triton on CUDA, the C++ backend on CPU) and ``reference`` (the same model with every llmkern op
  running its pure-PyTorch reference).

``extra_info``: ``tokens/s`` (batch x sequence length over the median time), ``TFLOP/s`` (the usual
``6 N T`` estimate for forward+backward, ``2 N T`` for forward, N = non-embedding parameters, plus the
attention matmuls), ``peak_memory_MB`` and the machine.
"""
from __future__ import annotations

import functools

import pytest
import torch

import llmkern
from llmkern.models import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SHAPE = dict(vocab=32000, dim=1024, layers=8, heads=16, kv_heads=8, hidden=2816, batch=8, seq=1024)
    DTYPE = torch.bfloat16
else:  # sized so that the whole file runs in a couple of minutes on a 2-core CPU
    SHAPE = dict(vocab=4096, dim=256, layers=4, heads=8, kv_heads=4, hidden=704, batch=4, seq=256)
    DTYPE = torch.float32


def _hf_llama() -> torch.nn.Module:
    s = SHAPE
    config = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=s["seq"],
        rms_norm_eps=1e-5, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def _transformer() -> torch.nn.Module:
    s = SHAPE
    return Transformer(TransformerConfig(
        vocab_size=s["vocab"], dim=s["dim"], n_layers=s["layers"], n_heads=s["heads"], n_kv_heads=s["kv_heads"],
        hidden_dim=s["hidden"], max_seq_len=s["seq"]))


@functools.lru_cache(maxsize=None)
def _model(name: str, provider: str) -> torch.nn.Module:
    torch.manual_seed(0)                                                         # same weights for every provider
    if name == "hf-llama":
        model = _hf_llama()
        if provider == "llmkern":
            llmkern.swap_modules(model)
    else:
        model = _transformer()
    return model.to(DEVICE, DTYPE).train()


def _loss(name: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if name == "hf-llama":
        return model(input_ids=ids, labels=ids).loss
    return model(ids, labels=ids)[1]


def _flops(tokens: int, mode: str) -> float:
    s = SHAPE
    e = s["dim"] // s["heads"]
    per_layer = s["dim"] * e * (2 * s["heads"] + 2 * s["kv_heads"]) + 3 * s["dim"] * s["hidden"]
    params = s["layers"] * per_layer + s["dim"] * s["vocab"]                     # + the LM head
    attention = s["layers"] * 2 * s["heads"] * s["seq"] * e                      # QK^T and PV per token, causal half
    forward = 2 * tokens * (params + attention)
    return forward * (3 if mode == "fwd+bwd" else 1)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("model, provider", [
    ("hf-llama", "torch"), ("hf-llama", "llmkern"), ("transformer", "reference"), ("transformer", "llmkern"),
])
def test_model_tokens_per_second(benchmark, peak_memory, synchronized, model, provider, mode):
    net = _model(model, provider)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]), device=DEVICE)
    backend = "reference" if provider == "reference" else "auto"

    def step():
        with llmkern.use_backend(backend):
            if mode == "fwd":
                with torch.no_grad():
                    _loss(model, net, ids)
            else:
                net.zero_grad(set_to_none=True)
                _loss(model, net, ids).backward()

    run = synchronized(step)
    run()                                                                        # warm up: JIT builds, autotuning
    peak_memory(run, DEVICE)
    if CUDA:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    tokens = SHAPE["batch"] * SHAPE["seq"]
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({"tokens/s": tokens / median, "TFLOP/s": _flops(tokens, mode) / median / 1e12,
                                 "shape": SHAPE, "dtype": str(DTYPE).removeprefix("torch.")})
