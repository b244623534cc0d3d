"""Reference NF4 4-bit block quantization with double quantization, byte-identical to bitsandbytes.

This module is the specification of the ``nf4`` op family; every backend reproduces its bytes.

NF4 quantization (``bitsandbytes.functional.quantize_4bit(A, blocksize, quant_type="nf4")``)
    ``x`` is flattened (``n`` elements) and cut into blocks of ``blocksize``; the last block may be
    partial. Per block, in float32 (fp16/bf16 inputs are widened exactly):

    * ``absmax = max(|x|)``; for the partial last block it is ``max(max(|x|), 1e-38)``.
    * full blocks: ``s = clamp(x * reciprocal(max(absmax, 1e-38)), -1, 1)``;
      the partial last block divides: ``s = clamp(x / absmax, -1, 1)``.
    * the 4-bit code is the index of the nearest :data:`NF4_CODE` entry, found as the number of
      midpoints ``(code[i] + code[i+1]) / 2`` strictly below ``s`` (a tie goes to the lower code).
    * codes are packed two per byte, **first element in the high nibble**; an odd ``n`` pads one
      extra element with value 0, whose code is 7. ``packed`` has ``(n + 1) // 2`` bytes.

Double quantization (``compress_statistics=True``)
    ``offset = absmax.mean()`` (torch's float32 mean) and the 8-bit *dynamic* blockwise
    quantization of ``absmax - offset`` with blocks of 256 (:func:`dynamic_quantize`).

8-bit dynamic blockwise quantization (bitsandbytes' CPU ``quantize_blockwise``)
    Per block of ``a`` (float32): ``absmax2 = max(|a|)``; a block with ``absmax2 == 0`` gets codes 0.
    Otherwise ``v = clamp(a * (1 / absmax2), -1, 1)``, ``i = trunc((v + 1) * 0.5 * 65535 + 0.5)`` and
    the code is ``lut[i]`` with the 65536-entry table of :func:`quantize_lut`, which maps each of the
    65536 evenly spaced points ``-1 + 2 i / 65535`` of [-1, 1] to its nearest :func:`dynamic_code`
    entry (ties to the lower). bitsandbytes' CUDA kernel searches the nearest entry exactly instead;
    the two differ only for values whose nearest entries lie closer than the table's 3e-5 spacing.

Dequantization
    ``absmax`` is recovered as ``float32(code2[q] * absmax2[block]) + offset`` (two roundings, no
    fused multiply-add) when nested; each element is ``float32(NF4_CODE[nibble] * absmax[block])``,
    then rounded to the output dtype.
"""
from __future__ import annotations

import functools

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
ABSMAX_FLOOR = 1e-38

# The 16 NF4 values (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], as float32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_CODE = 7


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table, (16,) float32, index = 4-bit code."""
    return _nf4_code_cpu().to(device)


def nf4_bounds(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 float32 midpoints ``(code[i] + code[i+1]) / 2`` that separate the NF4 codes."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # Signed dynamic map of Dettmers (2016), 7 exponent bits: for exponent e = 0..6 the 2**e
    # midpoints of linspace(0.1, 1, 2**e + 1) scaled by 10**(e - 6), both signs, plus 0 and 1.
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist()
        values += (-(10 ** (e - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed dynamic 8-bit map (bitsandbytes ``create_dynamic_map()``), sorted, float32."""
    return _dynamic_code_cpu().to(device)


def quantize_lut(code: torch.Tensor) -> torch.Tensor:
    """(65536,) uint8: for each point ``-1 + 2 i / 65535`` (float32) the nearest entry of the sorted
    256-entry ``code`` (ties to the lower), i.e. the number of midpoints ``0.5 * (c[j] + c[j+1])``
    strictly below the point. This is the table bitsandbytes' CPU quantizer looks codes up in."""
    code = code.detach().to("cpu", torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mids, points, right=False).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cpu() -> torch.Tensor:
    return quantize_lut(_dynamic_code_cpu())


def dynamic_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`quantize_lut` of :func:`dynamic_code`, on ``device``."""
    return _dynamic_lut_cpu().to(device)


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _padded_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = x.numel()
    nb = num_blocks(n, blocksize)
    out = x.new_zeros(nb * blocksize)
    out[:n] = x
    return out.view(nb, blocksize)


def nf4_quantize_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend contract of ``nf4_quantize``: x (n,) contiguous float32/float16/bfloat16, n >= 1.

    Returns ``packed`` ((n + 1) // 2,) uint8 and ``absmax`` (ceil(n / blocksize),) float32.
    """
    n = x.numel()
    xf = x.reshape(-1).float()
    blocks = _padded_blocks(xf, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * torch.reciprocal(absmax.clamp(min=ABSMAX_FLOOR))[:, None]
    rem = n % blocksize
    if rem:
        last = absmax[-1].clamp(min=ABSMAX_FLOOR)
        absmax[-1] = last
        scaled[-1, :rem] = xf[n - rem:] / last
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n]
    codes = torch.bucketize(scaled, nf4_bounds(x.device)).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dynamic_quantize(a: torch.Tensor, lut: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend contract of the 8-bit dynamic blockwise quantizer (bitsandbytes CPU ``quantize_blockwise``).

    a: (n,) float32 contiguous; lut: (65536,) uint8 from :func:`quantize_lut`.
    Returns ``codes`` (n,) uint8 and ``absmax`` (ceil(n / blocksize),) float32.
    """
    n = a.numel()
    blocks = _padded_blocks(a.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), torch.reciprocal(absmax))
    v = (blocks * inv[:, None]).clamp(-1, 1)
    index = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    codes = lut.to(a.device)[index]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].contiguous(), absmax


def dynamic_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of :func:`dynamic_quantize`: ``code[codes[i]] * absmax[i // blocksize]``, (n,) float32."""
    n = codes.numel()
    values = code.to(codes.device, torch.float32)[codes.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return values * scale


def nf4_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
               offset: torch.Tensor | None, nested_blocksize: int) -> torch.Tensor:
    """The float32 per-block absmax of a state: ``absmax`` itself, or its double-quant decode."""
    if nested_absmax is None:
        return absmax.float()
    return dynamic_dequantize(absmax, nested_absmax, nested_code, nested_blocksize) + offset.float()


def nf4_dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                          nested_code: torch.Tensor | None, offset: torch.Tensor | None, n: int, blocksize: int,
                          nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Backend contract of ``nf4_dequantize``: one pass from packed nibbles to ``dtype``.

    packed: ((n + 1) // 2,) uint8. Not nested: ``absmax`` (nblocks,) float32 and the nested
    arguments None. Nested: ``absmax`` (nblocks,) uint8 codes of ``nested_code`` (256,) float32,
    ``nested_absmax`` (ceil(nblocks / nested_blocksize),) float32, ``offset`` 0-dim float32.
    Returns (n,) ``dtype``.
    """
    scale = nf4_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    values = nf4_code(packed.device)[codes]
    return (values * scale.repeat_interleave(blocksize)[:n]).to(dtype)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
               nested_code: torch.Tensor | None, offset: torch.Tensor | None, out_features: int, in_features: int,
               blocksize: int, nested_blocksize: int) -> torch.Tensor:
    """Backend contract of ``nf4_linear``: ``x @ W.T`` with W the float32 dequantization, (out, in).

    x: (M, in) float32/float16/bfloat16. Accumulates in float32 and returns (M, out) in x's dtype.
    """
    w = nf4_dequantize_blocks(packed, absmax, nested_absmax, nested_code, offset, out_features * in_features,
                              blocksize, nested_blocksize, torch.float32)
    return (x.float() @ w.view(out_features, in_features).T).to(x.dtype)


def nf4_linear_grad_input(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                          nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                          offset: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
                          nested_blocksize: int) -> torch.Tensor:
    """Backend contract of the ``nf4_linear`` backward: ``dx = dy @ W``, dy (M, out) -> (M, in) in dy's dtype."""
    w = nf4_dequantize_blocks(packed, absmax, nested_absmax, nested_code, offset, out_features * in_features,
                              blocksize, nested_blocksize, torch.float32)
    return (dy.float() @ w.view(out_features, in_features)).to(dy.dtype)
