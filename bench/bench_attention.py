"""Attention: llmkern against every backend of torch.nn.functional.scaled_dot_product_attention.

    python -m pytest bench/bench_attention.py --benchmark-only --benchmark-group-by=param:shape,param:causal,param:dtype,param:mode

Providers: ``llmkern`` (Triton on CUDA; on CPU its ``cpu`` backend, which is torch's CPU flash
kernel computing in fp32), ``reference`` (llmkern's pure-PyTorch path, L x L scores), and torch's
SDPA pinned to one backend with ``torch.nn.attention.sdpa_kernel``: ``torch-flash``,
``torch-efficient``, ``torch-cudnn``, ``torch-math`` (a backend that cannot run the input is
skipped with torch's reason). Training shapes are (B, H, L, E) with Lq = Lk = L; the decode group
is one query row per sequence against a KV cache of Lk keys with 8 key/value heads (GQA).

``extra_info``: ``TFLOP/s`` (forward 4 B H Lq Lk E flops, halved when causal; backward 2.5x the
forward, so fwd+bwd counts 3.5x), for decode also ``GB/s`` (K and V bytes read), the device, and
on CUDA ``peak_memory_MB`` (peak allocated during the measured calls minus what was allocated
before).
"""
from __future__ import annotations

import os
import platform

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmkern
from llmkern import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SHAPES = [(4, 32, length, e) for e in (64, 128) for length in (512, 1024, 2048, 4096, 8192)]
    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
    DECODE = [(4, 32, 8, lk, 128) for lk in (4096, 32768)]
else:  # sized so the whole file runs in about two minutes on a small CPU
    SHAPES = [(1, 4, 256, 64), (1, 4, 1024, 64)]
    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
    DECODE = [(1, 8, 2, 4096, 64)]
TORCH_BACKENDS = {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "torch-cudnn": SDPBackend.CUDNN_ATTENTION, "torch-math": SDPBackend.MATH}
PROVIDERS = ["llmkern", "reference", *TORCH_BACKENDS]
LLMKERN_BACKEND = "triton" if CUDA else "cpu"
# The L x L providers (reference, torch-math) past this many score elements take minutes per case (or all memory).
MAX_SCORES = 4 * 32 * 4096 * 4096 if CUDA else 1 * 4 * 1024 * 1024


def _device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _context(provider: str):
    """The context that pins the provider's backend, around the forward and the backward."""
    if provider == "llmkern":
        return llmkern.use_backend(LLMKERN_BACKEND)
    if provider == "reference":
        return llmkern.use_backend("reference")
    return sdpa_kernel(TORCH_BACKENDS[provider])


def _attention(provider: str, q, k, v, causal: bool):
    sdpa = ops.scaled_dot_product_attention if provider in ("llmkern", "reference") else F.scaled_dot_product_attention
    return sdpa(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def _measure(benchmark, provider, fn, *, mode, tensors, dout):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
    else:
        for t in tensors:
            t.requires_grad_(True)

        def run():
            for t in tensors:
                t.grad = None
            fn().backward(dout)

    def timed():
        with _context(provider):
            run()
        if CUDA:
            torch.cuda.synchronize()

    try:
        timed()  # compile / autotune / warm caches outside the measurement
    except RuntimeError as exc:  # torch: "No available kernel" for a backend that cannot run this input
        if any(why in str(exc) for why in ("No available kernel", "No viable backend")):
            pytest.skip(f"torch cannot run this input on the chosen backend: {str(exc).splitlines()[0][:200]}")
        raise
    if CUDA:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        benchmark(timed)
        benchmark.extra_info["peak_memory_MB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["device"] = _device_name()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}H{h}L{n}E{e}" for b, h, n, e in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, provider, shape, causal, dtype, mode):
    b, h, length, e = shape
    if provider in ("reference", "torch-math") and b * h * length * length > MAX_SCORES:
        pytest.skip(f"{provider} materialises the {b}x{h}x{length}x{length} scores: too slow at this size")
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(b, h, length, e, device=DEVICE, dtype=dt) for _ in range(3))
    dout = torch.randn(b, h, length, e, device=DEVICE, dtype=dt)
    _measure(benchmark, provider, lambda: _attention(provider, q, k, v, causal), mode=mode, tensors=(q, k, v), dout=dout)
    flops = 4 * b * h * length * length * e * (0.5 if causal else 1.0) * (1.0 if mode == "fwd" else 3.5)
    benchmark.extra_info["TFLOP/s"] = flops / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", DECODE, ids=[f"B{b}H{h}kv{g}Lk{n}E{e}" for b, h, g, n, e in DECODE])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_decode(benchmark, provider, shape, dtype):
    b, h, h_kv, lk, e = shape
    dt = DTYPES[dtype]
    q = torch.randn(b, h, 1, e, device=DEVICE, dtype=dt)
    k, v = (torch.randn(b, h_kv, lk, e, device=DEVICE, dtype=dt) for _ in range(2))
    _measure(benchmark, provider, lambda: _attention(provider, q, k, v, False), mode="fwd", tensors=(q, k, v), dout=None)
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = 2 * k.numel() * k.element_size() / median / 1e9
    benchmark.extra_info["TFLOP/s"] = 4 * b * h * lk * e / median / 1e12
