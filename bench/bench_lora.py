"""LoRA / QLoRA linear: llmkern's fused layer against PEFT's unfused one and the base layer alone.

    python -m pytest bench/bench_lora.py --benchmark-only --benchmark-group-by=param:base,param:shape,param:dtype,param:mode

Providers, for a (d_out = d_in = d) layer without bias, rank r, lora_alpha = 2r, no dropout:

* ``llmkern``: :class:`llmkern.nn.LoRALinear` over ``nn.Linear`` (``base=dense``) or over
  :class:`llmkern.nn.LinearNF4` (``base=nf4``, double quant, blocksize 64): Triton on CUDA, the
  ``cpu`` backend on CPU.
* ``peft``: PEFT's ``lora.Linear`` over ``nn.Linear`` or over ``bitsandbytes.nn.Linear4bit`` (nf4,
  double quant) — the unfused computation ``base(x) + B(A(dropout(x))) * s``; adapters kept in the
  compute dtype (``autocast_adapter_dtype=False``) so both sides compute in the same precision.
* ``base``: the frozen base layer alone (``nn.Linear`` / bnb ``Linear4bit``): the cost a LoRA layer
  adds to. ``fwd+bwd`` of the base is its forward plus dX.

Shapes are (M tokens, d, r). The GPU shapes (M = 4096..16384, d = 4096, r = 16) are skipped on CPU;
the CPU shapes are small enough for the whole file to run in a few minutes on two cores.
``extra_info``: ``TFLOP/s`` over each provider's own flops (forward ``2Md(d + 2r)``, backward
``2Md(d + 4r)``; the base alone ``2Md^2`` each), ``peak_memory_MB`` of one call beyond what was
allocated before it, the machine and the date.
"""
from __future__ import annotations

import pytest
import torch

import llmkern
from llmkern.nn import LinearNF4, LoRALinear

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
GPU_SHAPES = [(4096, 4096, 16), (8192, 4096, 16), (16384, 4096, 16)]
CPU_SHAPES = [(512, 1024, 16), (2048, 1024, 16)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16} if CUDA else {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = CPU_SHAPES + GPU_SHAPES
LLMKERN_BACKEND = "triton" if CUDA else "cpu"


def _peft_model(base: torch.nn.Module, r: int) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["0"])
    return peft.get_peft_model(torch.nn.Sequential(base), config, autocast_adapter_dtype=False)


def _bnb_linear4bit(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                              quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(linear.state_dict())
    return layer.to(DEVICE)  # quantizes


def _layer(provider: str, base: str, d: int, r: int, dtype: torch.dtype) -> torch.nn.Module:
    linear = torch.nn.Linear(d, d, bias=False, device=DEVICE, dtype=dtype).requires_grad_(False)
    if provider == "llmkern":
        frozen = LinearNF4.from_linear(linear, compute_dtype=dtype) if base == "nf4" else linear
        layer = LoRALinear(frozen, r=r, lora_alpha=2 * r)
    else:
        frozen = _bnb_linear4bit(linear, dtype) if base == "nf4" else linear
        layer = _peft_model(frozen, r) if provider == "peft" else frozen
    for name, p in layer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a trained adapter, not the zero init
    return layer.to(DEVICE)


def _flops(provider: str, m: int, d: int, r: int, mode: str) -> float:
    if provider == "base":
        fwd = bwd = 2 * m * d * d
    else:
        fwd, bwd = 2 * m * d * (d + 2 * r), 2 * m * d * (d + 4 * r)
    return fwd + (bwd if mode == "fwd+bwd" else 0)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}-d{d}-r{r}" for m, d, r in SHAPES])
@pytest.mark.parametrize("provider", ["llmkern", "peft", "base"])
def test_lora(benchmark, peak_memory, throughput, synchronized, provider, shape, base, dtype, mode):
    if shape in GPU_SHAPES and not CUDA:
        pytest.skip("GPU size: d=4096 with M up to 16384 takes minutes per case on a CPU")
    m, d, r = shape
    dt = DTYPES[dtype]
    layer = _layer(provider, base, d, r, dt).train()
    x = torch.randn(m, d, device=DEVICE, dtype=dt)
    dy = torch.randn(m, d, device=DEVICE, dtype=dt)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                layer(x)
    else:
        x.requires_grad_(True)
        params = [p for p in layer.parameters() if p.requires_grad]

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            layer(x).backward(dy)

    @synchronized
    def run():
        with llmkern.use_backend(LLMKERN_BACKEND):
            step()

    run()  # compile / autotune / build outside the measurement
    peak_memory(run, DEVICE)
    if CUDA:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    throughput(flops=_flops(provider, m, d, r, mode))
    benchmark.extra_info["backend"] = LLMKERN_BACKEND if provider == "llmkern" else provider
