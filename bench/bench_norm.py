"""LayerNorm / RMSNorm: llmkern against torch.nn.functional, forward and forward+backward.

    python -m pytest bench/bench_norm.py --benchmark-only \
        --benchmark-group-by=param:kind,param:shape,param:dtype,param:mode

Providers:

* ``llmkern``: :func:`llmkern.ops.layer_norm` / :func:`~llmkern.ops.rms_norm` on the C++ backend
  (CPU) or Triton (CUDA);
* ``reference``: the same ops on llmkern's pure-PyTorch reference path;
* ``torch``: ``torch.nn.functional`` eager; ``torch.compile``: the same compiled (CUDA only).

Shapes are (rows, hidden) with weight (and bias for LayerNorm). ``fwd`` runs under ``no_grad``;
``fwd+bwd`` also computes the gradients of x, weight and bias. ``extra_info``: ``GB/s`` counts the
bytes every provider must move at least (x read and y written; for the backward also x and dy
read and dx written) over the median time; ``peak_memory_MB`` of one call; machine and date.

On CPU, glibc may return freed buffers to the OS between calls; the page faults of the next
allocation then dominate every provider's time. For kernel-level numbers run with
``MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000`` (and ``OMP_NUM_THREADS=1``
on a machine shared with other jobs), and compare the ``min`` column.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# CPU shapes are smaller so that the whole file runs in a few minutes on two cores.
SHAPES = [(4096, 1024), (8192, 4096)] if CUDA else [(4096, 1024), (2048, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LLMKERN_BACKEND = "triton" if CUDA else "cpu"


def _functional(provider: str, kind: str):
    lib = ops if provider in ("llmkern", "reference") else F
    if kind == "layer_norm":
        fn = lambda x, w, b: lib.layer_norm(x, (x.shape[-1],), w, b, 1e-5)  # noqa: E731
    else:
        fn = lambda x, w, b: lib.rms_norm(x, (x.shape[-1],), w, 1e-6)  # noqa: E731
    return torch.compile(fn) if provider == "torch.compile" else fn


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("provider", ["llmkern", "reference", "torch", "torch.compile"])
def test_norm(benchmark, peak_memory, throughput, synchronized, provider, kind, shape, dtype, mode):
    if provider == "torch.compile" and not CUDA:
        pytest.skip("torch.compile is compared on CUDA only, where llmkern's Triton kernels compete with it")
    m, n = shape
    dt = DTYPES[dtype]
    x = torch.randn(m, n, device=DEVICE, dtype=dt)
    w = torch.randn(n, device=DEVICE, dtype=dt)
    b = torch.randn(n, device=DEVICE, dtype=dt) if kind == "layer_norm" else None
    dy = torch.randn(m, n, device=DEVICE, dtype=dt)
    fn = _functional(provider, kind)
    backend = "reference" if provider == "reference" else LLMKERN_BACKEND
    leaves = [t.requires_grad_(mode == "fwd+bwd") for t in (x, w, b) if t is not None]

    def run():
        with llmkern.use_backend(backend):
            if mode == "fwd":
                with torch.no_grad():
                    fn(x, w, b)
            else:
                for t in leaves:
                    t.grad = None
                fn(x, w, b).backward(dy)

    timed = synchronized(run)
    timed()  # compile / build / warm up outside the measurement
    peak_memory(timed, DEVICE)
    benchmark(timed)
    throughput(bytes=(2 if mode == "fwd" else 5) * m * n * x.element_size())
    benchmark.extra_info["backend"] = backend if provider in ("llmkern", "reference") else provider
