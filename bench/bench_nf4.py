"""NF4: llmkern against bitsandbytes on a 4096 x 4096 weight (blocksize 64, double quantization).

    python -m pytest bench/bench_nf4.py --benchmark-only

Providers: ``llmkern`` (its ``auto`` backend: the C++ kernels on CPU, Triton on CUDA) and
``bitsandbytes`` (``quantize_4bit`` / ``dequantize_4bit`` / ``nn.Linear4bit``, on the same device).
Cases:

* ``test_quantize``: ``nf4_quantize(W, 64, double_quant=True)`` of an fp32 / bf16 W; ``GB/s`` counts
  the input read and the packed bytes + absmax written; ``peak_memory_MB`` is the memory one call
  needs beyond its input, outputs included (4096 x 4096: 8 MiB packed + 0.25 MiB nested stats).
* ``test_dequantize``: ``nf4_dequantize`` to bf16 / fp32; ``GB/s`` counts packed bytes read and the
  dense output written.
* ``test_linear``: ``LinearNF4`` against ``bnb.nn.Linear4bit`` (``compute_dtype=bf16``), batch 16 bf16:
  ``mode=fwd`` is inference (``eval()``, ``no_grad``: bitsandbytes then runs its fused AVX-512 bf16
  kernel on CPUs that have one, after repacking the weight once), ``mode=fwd+bwd`` is a training step
  (gradient to the input). ``TFLOP/s`` counts 2 * 16 * 4096 * 4096 flops per product.

Ratios come from one run: each case is one pytest-benchmark group ("quantize bf16", ...) holding
both providers.
"""
from __future__ import annotations

import pytest
import torch

import llmkern
from llmkern import ops

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
OUT, IN = 4096, 4096
BATCH = 16
BLOCKSIZE = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("llmkern", "bitsandbytes")
ROUNDS = {"bitsandbytes": 3, "llmkern": 10}  # bitsandbytes' CPU quantize takes seconds per call


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(OUT, IN, device=DEVICE) * 0.02


def _run(benchmark, synchronized, provider, fn):
    return benchmark.pedantic(synchronized(fn), rounds=ROUNDS[provider], warmup_rounds=1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_quantize(benchmark, synchronized, throughput, peak_memory, weight, provider, dtype):
    benchmark.group = f"quantize {dtype} {OUT}x{IN}"
    w = weight.to(DTYPES[dtype])
    if provider == "llmkern":
        def fn():
            return ops.nf4_quantize(w, BLOCKSIZE, double_quant=True)
    else:
        def fn():
            return bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    fn()
    peak_memory(fn, DEVICE)
    _run(benchmark, synchronized, provider, fn)
    throughput(bytes=w.numel() * w.element_size() + w.numel() // 2 + w.numel() // BLOCKSIZE)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dequantize(benchmark, synchronized, throughput, weight, provider, dtype):
    benchmark.group = f"dequantize to {dtype} {OUT}x{IN}"
    out_dtype = DTYPES[dtype]
    if provider == "llmkern":
        packed, state = ops.nf4_quantize(weight, BLOCKSIZE, double_quant=True)

        def fn():
            return ops.nf4_dequantize(packed, state, out_dtype)
    else:
        q, bstate = bnbF.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        bstate.dtype = out_dtype

        def fn():
            return bnbF.dequantize_4bit(q, bstate, quant_type="nf4")
    _run(benchmark, synchronized, provider, fn)
    throughput(bytes=weight.numel() // 2 + weight.numel() * torch.empty(0, dtype=out_dtype).element_size())


@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear(benchmark, synchronized, throughput, weight, provider, mode):
    benchmark.group = f"linear {mode} bf16 batch {BATCH} {OUT}x{IN}"
    linear = torch.nn.Linear(IN, OUT, bias=False, device=DEVICE)
    with torch.no_grad():
        linear.weight.copy_(weight)
    linear = linear.to(torch.bfloat16)
    if provider == "llmkern":
        layer = llmkern.nn.LinearNF4.from_linear(linear, BLOCKSIZE, double_quant=True, compute_dtype=torch.bfloat16)
    else:
        layer = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4")
        layer.load_state_dict(linear.state_dict())
        layer = layer.to(DEVICE)  # quantizes
    x = torch.randn(BATCH, IN, dtype=torch.bfloat16, device=DEVICE)
    if mode == "fwd":
        layer.eval()

        def fn():
            with torch.no_grad():
                return layer(x)
    else:
        x.requires_grad_(True)
        dy = torch.randn(BATCH, OUT, dtype=torch.bfloat16, device=DEVICE)

        def fn():
            x.grad = None
            layer(x).backward(dy)
    _run(benchmark, synchronized, provider, fn)
    throughput(flops=2 * BATCH * IN * OUT * (1 if mode == "fwd" else 2))
