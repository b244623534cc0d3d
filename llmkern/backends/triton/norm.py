"""Triton launchers for the norm contract of :mod:`llmkern.reference.norm` (``norm_fwd`` / ``norm_bwd``).

fp32/fp16/bf16 tensors; a float64 tensor raises :class:`~llmkern.backends.Unsupported`, so the call
falls back to the reference. Kernels: :mod:`llmkern.kernels.norm`.
"""
from __future__ import annotations

import torch
import triton

from llmkern.backends import require_dtypes
from llmkern.backends.triton._aot import AotSpec
from llmkern.backends.triton._launch import (
    GPU_TILE_ELEMENTS, device_guard, lastdim_contiguous, num_programs, row_config,
)
from llmkern.kernels.norm import norm_bwd_kernel, norm_bwd_wide_kernel, norm_fwd_kernel, norm_fwd_wide_kernel


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Widest row a program holds in registers; wider rows run the chunked ``*_wide`` kernels, the backward
# one in chunks of BWD_CHUNK. The backward keeps more tensors live per element, so its limits are lower
# (a whole row of 8192, or chunks of 4096, spill registers on sm_90).
MAX_FWD_BLOCK = 8192
MAX_BWD_BLOCK = 4096
BWD_CHUNK = 2048


def _bwd_config(n: int, m: int, tile: int | None = None):
    cfg = row_config("norm_bwd", n, m, tile=tile, max_block=MAX_BWD_BLOCK)
    return cfg if cfg.chunks == 1 else row_config("norm_bwd", n, m, tile=tile, max_block=BWD_CHUNK)


def norm_fwd(x, residual, weight, bias, eps: float, rms: bool):
    """See :func:`llmkern.reference.norm.norm_fwd`; x, residual: (M, N); weight, bias: (N,) or None."""
    require_dtypes(_DTYPES, x=x, residual=residual, weight=weight, bias=bias)
    x, residual = lastdim_contiguous(x), lastdim_contiguous(residual)
    weight, bias = lastdim_contiguous(weight), lastdim_contiguous(bias)
    m, n = x.shape
    cfg = row_config("norm_fwd", n, m, max_block=MAX_FWD_BLOCK)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    residual_out = x.new_empty(0) if residual is None else torch.empty((m, n), dtype=residual.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = torch.empty(0 if rms else m, dtype=torch.float32, device=x.device)
    has_res = residual is not None
    args = (
        x, residual if has_res else x, weight if weight is not None else x, bias if bias is not None else x,
        out, residual_out if has_res else out, rstd if rms else mean, rstd,
        x.stride(0), residual.stride(0) if has_res else 0, out.stride(0), residual_out.stride(0) if has_res else 0,
    )
    flags = dict(IS_RMS=rms, HAS_RESIDUAL=has_res, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, enable_fp_fusion=True)
    with device_guard(x):
        if cfg.chunks > 1:
            norm_fwd_wide_kernel[(m,)](*args, n, eps, **flags)
        else:
            norm_fwd_kernel[(triton.cdiv(m, cfg.block_m),)](*args, m, n, eps, BLOCK_M=cfg.block_m, **flags)
    return out, residual_out, mean, rstd


def norm_bwd(dy, dresidual_out, h, weight, bias, mean, rstd, eps: float, rms: bool):
    """See :func:`llmkern.reference.norm.norm_bwd`; dweight/dbias are deterministic."""
    require_dtypes(_DTYPES, dy=dy, dresidual_out=dresidual_out, h=h, weight=weight, bias=bias)
    dy, dresidual_out, h = lastdim_contiguous(dy), lastdim_contiguous(dresidual_out), lastdim_contiguous(h)
    weight = lastdim_contiguous(weight)
    m, n = h.shape
    cfg = _bwd_config(n, m)
    tiles = triton.cdiv(m, cfg.block_m)
    programs = num_programs(h.device, tiles)
    rows_per_program = triton.cdiv(tiles, programs) * cfg.block_m
    programs = triton.cdiv(m, rows_per_program)
    dh = torch.empty((m, n), dtype=torch.promote_types(dy.dtype, h.dtype), device=h.device)
    dw_partial = torch.empty((programs, n) if weight is not None else 0, dtype=torch.float32, device=h.device)
    db_partial = torch.empty((programs, n) if bias is not None else 0, dtype=torch.float32, device=h.device)
    has_dres = dresidual_out is not None
    args = (
        dy, dresidual_out if has_dres else dy, h, weight if weight is not None else h,
        rstd if rms else mean, rstd, dh,
        dw_partial if weight is not None else dh, db_partial if bias is not None else dh,
    )
    strides = (dy.stride(0), dresidual_out.stride(0) if has_dres else 0, h.stride(0), dh.stride(0))
    # No FMA contraction: dh must subtract c1 from the same rounded g = dy * w that c1 sums
    # (a fused dy * w - c1 leaves a rounding residue times rstd where the answer is exactly 0).
    flags = dict(IS_RMS=rms, HAS_DRESIDUAL=has_dres, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, enable_fp_fusion=False)
    with device_guard(h):
        if cfg.chunks > 1:
            row_sums = torch.empty((m, 2), dtype=torch.float32, device=h.device)
            norm_bwd_wide_kernel[(programs,)](*args, row_sums, *strides, m, n, rows_per_program, **flags)
        else:
            norm_bwd_kernel[(programs,)](*args, *strides, m, n, rows_per_program, BLOCK_M=cfg.block_m, **flags)
    dweight = dw_partial.sum(0).to(weight.dtype) if weight is not None else dy.new_empty(0)
    dbias = db_partial.sum(0).to(bias.dtype) if bias is not None else dy.new_empty(0)
    return dh, dweight, dbias


# fp16 compiles like bf16 (same register use: only the conversion instructions differ), so the
# ahead-of-time list carries fp32 and bf16 and stays small enough for the test suite.
_POINTER_TYPES = {"fp32": "*fp32", "bf16": "*bf16"}


def _fwd_spec(n: int, rms: bool, dtype: str) -> AotSpec:
    cfg = row_config("norm_fwd", n, m=1 << 20, tile=GPU_TILE_ELEMENTS, max_block=MAX_FWD_BLOCK)
    ptr = _POINTER_TYPES[dtype]
    wide = cfg.chunks > 1
    signature = {"X": ptr, "RES": ptr, "W": ptr, "B": ptr, "OUT": ptr, "RES_OUT": ptr, "MEAN": "*fp32",
                 "RSTD": "*fp32", "stride_x": "i64", "stride_res": "i64", "stride_out": "i64",
                 "stride_res_out": "i64", **({} if wide else {"M": "i32"}), "N": "i32", "eps": "fp32"}
    constants = {"IS_RMS": rms, "HAS_RESIDUAL": True, "HAS_WEIGHT": True, "HAS_BIAS": not rms,
                 "BLOCK_N": cfg.block_n, **({} if wide else {"BLOCK_M": cfg.block_m})}
    kind = "rms" if rms else "layer"
    name = (f"norm_fwd_wide[{kind}, BLOCK_N={cfg.block_n}, {dtype}]" if wide
            else f"norm_fwd[{kind}, BLOCK_M={cfg.block_m}, BLOCK_N={cfg.block_n}, {dtype}]")
    return AotSpec(name=name, fn=norm_fwd_wide_kernel if wide else norm_fwd_kernel, signature=signature,
                   constants=constants, num_warps=cfg.num_warps)


def _bwd_spec(n: int, rms: bool, dtype: str) -> AotSpec:
    cfg = _bwd_config(n, 1 << 20, tile=GPU_TILE_ELEMENTS)
    ptr = _POINTER_TYPES[dtype]
    wide = cfg.chunks > 1
    signature = {"DY": ptr, "DRES": ptr, "H": ptr, "W": ptr, "MEAN": "*fp32", "RSTD": "*fp32", "DH": ptr,
                 "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", **({"ROW_SUMS": "*fp32"} if wide else {}),
                 "stride_dy": "i64", "stride_dres": "i64", "stride_h": "i64", "stride_dh": "i64", "M": "i32",
                 "N": "i32", "rows_per_program": "i32"}
    constants = {"IS_RMS": rms, "HAS_DRESIDUAL": True, "HAS_WEIGHT": True, "HAS_BIAS": not rms,
                 "BLOCK_N": cfg.block_n, **({} if wide else {"BLOCK_M": cfg.block_m})}
    kind = "rms" if rms else "layer"
    name = (f"norm_bwd_wide[{kind}, BLOCK_N={cfg.block_n}, {dtype}]" if wide
            else f"norm_bwd[{kind}, BLOCK_M={cfg.block_m}, BLOCK_N={cfg.block_n}, {dtype}]")
    return AotSpec(name=name, fn=norm_bwd_wide_kernel if wide else norm_bwd_kernel, signature=signature,
                   constants=constants, num_warps=cfg.num_warps)


def aot_specs() -> list[AotSpec]:
    """The launches of hidden sizes 1024, 4096, 8192 and 65536 (wider rows than the register limits run
    the chunked kernels, whose configuration no longer depends on the size): LayerNorm and RMSNorm with
    residual and weight (and bias for LayerNorm), fp32 and bf16, forward and backward."""
    specs: dict[str, AotSpec] = {}
    for n in (1024, 4096, 8192, 65536):
        for rms in (False, True):
            for dtype in _POINTER_TYPES:
                for spec in (_fwd_spec(n, rms, dtype), _bwd_spec(n, rms, dtype)):
                    specs.setdefault(spec.name, spec)
    return list(specs.values())
