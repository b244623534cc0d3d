"""CPU implementation of the LoRA contract of :mod:`llmkern.reference.lora`.

The GEMMs are torch's (oneDNN / MKL), arranged so that no (M, N) LoRA temporary exists: the rank-r
product is added into the base output in place (``out.addmm_(xa, B^T)``, and ``dX.addmm_(g, A)`` in
the backward), where PEFT materialises ``B(A(x))``, its scaled copy and the sum. The dropout mask
comes from the C++ extension ``csrc/lora.cpp`` (Philox, the same bits as the Triton kernels) and is
regenerated in the backward. An NF4 base weight is dequantized (by the nf4 family's ``nf4_dequantize``
backend, in the compute dtype, from the decoded float32 absmax as a plain state) at most
:data:`CHUNK_ELEMENTS` values at a time, each chunk feeding one torch GEMM: the forward takes row
chunks of W (``out[:, rows] = x @ W[rows]^T``), the dX product column blocks of W
(``dX[:, cols] = dY @ W[:, cols]``, assembled from row chunks) so that every output is one full-length
reduction with a single rounding. Dequantizing is ~1000x cheaper than the GEMM, so redoing it per
column block costs nothing measurable, while torch's GEMM is several times faster than a tile-by-tile
dot kernel once the batch has more than a few dozen rows.

Products run in the input's dtype as PEFT's do (xa is rounded to it before ``@ B^T``); xa is returned
in fp32 for the contract. float64 runs for dense weights; NF4 with float64 raises
:class:`~llmkern.backends.Unsupported` (fallback to the reference). Importing this module builds the
extension (once, cached) and raises :class:`~llmkern.backends.ExtensionError` when it cannot be built.
"""
from __future__ import annotations

import math

import torch

from llmkern.backends import dispatch, require_dtypes
from llmkern.backends.cpu import load_extension
from llmkern.reference.nf4 import NESTED_BLOCKSIZE

_ext = load_extension("lora")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NF4_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_ELEMENTS = 1 << 22  # dequantized NF4 weights held at once (8 MiB in bf16), per buffer


def _keep(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``t * keep`` (no 1/(1-p) scale), or ``t`` itself without dropout."""
    return t if p == 0.0 else _ext.dropout_keep(t.contiguous(), seed, p)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_chunks(n: int, k: int, blocksize: int) -> list[tuple[int, int]]:
    """Ranges of W rows of at most ~CHUNK_ELEMENTS values, each starting on a quantization block."""
    step = blocksize // math.gcd(k, blocksize)  # rows * k is then a multiple of blocksize (and even)
    rows = max(step, CHUNK_ELEMENTS // max(k, 1) // step * step)
    return [(n0, min(n, n0 + rows)) for n0 in range(0, n, rows)]


def _dequant_rows(packed, absmax, blocksize: int, k: int, n0: int, n1: int, dtype) -> torch.Tensor:
    """Rows n0:n1 of the NF4 W (k columns), dequantized to ``dtype``: (n1 - n0, k)."""
    e0, e1 = n0 * k, n1 * k
    flat = packed.reshape(-1)
    part = flat[e0 // 2:(e1 + 1) // 2]
    scales = absmax[e0 // blocksize:-(-e1 // blocksize)]
    deq = dispatch("nf4_dequantize", packed.device)
    return deq(part, scales, None, None, None, e1 - e0, blocksize, NESTED_BLOCKSIZE, dtype).view(n1 - n0, k)


def _nf4_linear(x, packed, absmax, blocksize, n):
    """x @ W^T, W (n, k) NF4, one GEMM per row chunk of W."""
    k = x.shape[1]
    out = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    for n0, n1 in _row_chunks(n, k, blocksize):
        torch.mm(x, _dequant_rows(packed, absmax, blocksize, k, n0, n1, x.dtype).t(), out=out[:, n0:n1])
    return out


def _nf4_grad_input(dy, packed, absmax, blocksize, k):
    """dy @ W, W (n, k) NF4, one GEMM per column block of W (each assembled from row chunks)."""
    n = dy.shape[1]
    chunks = _row_chunks(n, k, blocksize)
    cols = max(1, min(k, CHUNK_ELEMENTS // max(n, 1)))
    dx = torch.empty((dy.shape[0], k), device=dy.device, dtype=dy.dtype)
    for k0 in range(0, k, cols):
        k1 = min(k, k0 + cols)
        if len(chunks) == 1 and k1 - k0 == k:
            block = _dequant_rows(packed, absmax, blocksize, k, 0, n, dy.dtype)
        else:
            block = torch.empty((n, k1 - k0), device=dy.device, dtype=dy.dtype)
            for n0, n1 in chunks:
                block[n0:n1] = _dequant_rows(packed, absmax, blocksize, k, n0, n1, dy.dtype)[:, k0:k1]
        torch.mm(dy, block, out=dx[:, k0:k1])
    return dx


def lora_fwd(x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """See :func:`llmkern.reference.lora.lora_fwd`."""
    require_dtypes(_DTYPES if absmax is None else _NF4_DTYPES, x=x)
    if absmax is None:
        out = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    else:
        out = _nf4_linear(x, weight, absmax, blocksize, lora_B.shape[0])
        if bias is not None:
            out.add_(bias)
    inv_keep = 1.0 / (1.0 - dropout_p)
    xa = torch.mm(_keep(x, dropout_p, seed), lora_A.t())  # (M, r), x's dtype, without the 1/(1-p)
    out.addmm_(xa, lora_B.t(), alpha=scaling * inv_keep)
    xa_acc = xa.to(_acc(x))
    if dropout_p > 0.0:
        xa_acc.mul_(inv_keep)
    return out, xa_acc


def lora_bwd(dy, x, weight, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
    """See :func:`llmkern.reference.lora.lora_bwd`."""
    require_dtypes(_DTYPES if absmax is None else _NF4_DTYPES, x=x, dy=dy)
    inv_keep = 1.0 / (1.0 - dropout_p)
    g = torch.mm(dy, lora_B)  # (M, r)
    d_b = torch.mm(dy.t(), xa.to(dy.dtype)).mul_(scaling)
    d_a = torch.mm(g.t(), _keep(x, dropout_p, seed)).mul_(scaling * inv_keep)
    if not need_dx:
        return x.new_empty(0), d_a.to(lora_A.dtype), d_b.to(lora_B.dtype)
    if absmax is None:
        dx = torch.mm(dy, weight)
    else:
        dx = _nf4_grad_input(dy, weight, absmax, blocksize, x.shape[1])
    if dropout_p == 0.0:
        dx.addmm_(g, lora_A, alpha=scaling)
    else:
        dx.add_(_keep(torch.mm(g, lora_A), dropout_p, seed), alpha=scaling * inv_keep)
    return dx, d_a.to(lora_A.dtype), d_b.to(lora_B.dtype)
