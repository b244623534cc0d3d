"""Launchers for the LoRA / QLoRA kernels of :mod:`llmkern.kernels.lora` (contract: :mod:`llmkern.reference.lora`).

On a GPU the two GEMM-shaped kernels are autotuned (key: N, K, M rounded up to a power of two, dtypes)
over a short list per family (fp16/bf16 or fp32, dense or NF4 W); the dX kernel's lists are also per
architecture and each keeps one BLOCK_M, because its dA partial buffer (one row per row block) is
allocated before the autotuner picks. The xa and dy kernels run fixed configurations. In Triton's
interpreter every kernel runs one configuration sized to the problem (the interpreter cannot benchmark),
and bf16 / fp64 raise :class:`~llmkern.backends.Unsupported` (the interpreter computes bf16 wrongly;
these kernels have no fp64 path), so those calls fall back to the reference.
"""
from __future__ import annotations

import functools

import torch
import triton

from llmkern.backends import TRITON_INTERPRET, Unsupported, require_dtypes
from llmkern.backends.triton._aot import AotSpec
from llmkern.backends.triton._launch import device_guard
from llmkern.kernels.lora import lora_bwd_dx_kernel, lora_bwd_dy_kernel, lora_fwd_kernel, lora_xa_kernel

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

XA_BLOCK_M = 32
XA_BLOCK_K = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 16}  # larger K tiles spill (sm_80 / sm_90)
DY_BLOCK_N = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}  # fp32's FMA dots spill at 64 on sm_80
GEMM_BLOCK_R = 16  # rank chunk of the two GEMM kernels' rank-r prologue: larger chunks spill at BLOCK_M=128


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Autotune candidates per family: "half" (fp16/bf16 dense W), "nf4" (fp16/bf16, NF4 W), "fp32", "fp32-nf4"
# (fp32 dots run on FMA units and need smaller tiles). Each compiles without spills on sm_80 and sm_90.
FWD_CONFIGS = {
    "half": [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4)],
    "nf4": [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 3)],
    "fp32": [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 8, 3)],
    "fp32-nf4": [_cfg(64, 64, 32, 8, 2), _cfg(64, 32, 32, 8, 3)],
}
# dX candidates per (family, arch): every list has one BLOCK_M (the dA partials have one row per row block,
# allocated before the autotuner picks). sm_90's warpgroup MMAs hold BLOCK_M=128 without spills, sm_80's
# mma.sync does not.
DX_CONFIGS = {
    ("half", 90): [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4)],
    ("nf4", 90): [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 3)],
    ("half", 80): [_cfg(64, 128, 64, 4, 3), _cfg(64, 64, 64, 4, 4)],
    ("nf4", 80): [_cfg(64, 128, 64, 4, 3), _cfg(64, 64, 64, 4, 3)],
}
DX_CONFIGS["fp32", 80] = DX_CONFIGS["fp32", 90] = DX_CONFIGS["fp32-nf4", 80] = DX_CONFIGS["fp32-nf4", 90] = [
    _cfg(64, 32, 32, 8, 3)]


def _family(dtype: torch.dtype, nf4: bool) -> str:
    if dtype == torch.float32:
        return "fp32-nf4" if nf4 else "fp32"
    return "nf4" if nf4 else "half"


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> int:
    """90 for sm_90 and newer, else 80 (the config lists of :data:`DX_CONFIGS`)."""
    return 90 if torch.cuda.get_device_capability(index)[0] >= 9 else 80


def _device_arch(t: torch.Tensor) -> int:
    return _arch(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _unique(configs):
    seen, out = set(), []
    for c in configs:
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _prune_fwd(configs, named_args, **kwargs):
    return FWD_CONFIGS[_family(named_args["x_ptr"].dtype, named_args["w_ptr"].dtype == torch.uint8)]


def _prune_dx(configs, named_args, **kwargs):
    dy = named_args["dy_ptr"]
    return DX_CONFIGS[_family(dy.dtype, named_args["w_ptr"].dtype == torch.uint8), _device_arch(dy)]


_fwd_tuned = triton.autotune(configs=_unique(sum(FWD_CONFIGS.values(), [])), key=["N", "K", "M_BUCKET"],
                             prune_configs_by={"early_config_prune": _prune_fwd})(lora_fwd_kernel)
_dx_tuned = triton.autotune(configs=_unique(sum(DX_CONFIGS.values(), [])), key=["N", "K", "M_BUCKET"],
                            prune_configs_by={"early_config_prune": _prune_dx})(lora_bwd_dx_kernel)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _block_r(r: int, dtype: torch.dtype) -> int:
    """Rank chunk of the memory-bound xa / dy kernels: r <= 64 in one pass over x / dY for fp16/bf16;
    16 for fp32, whose FMA dots spill with wider chunks."""
    return _pow2(r, 16, 16 if dtype == torch.float32 else 64)


def _dy_block_ms(dtype: torch.dtype) -> tuple[int, ...]:
    """Row blocks of the dy kernel: 64, and 128 past 8192 rows (fewer dB partials) for fp16/bf16."""
    return (64,) if dtype == torch.float32 else (64, 128)


def _dy_warps(block_m: int) -> int:
    return 8 if block_m == 128 else 4


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands: torch's matmul precision setting ("highest" = no TF32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _check_supported(x: torch.Tensor) -> None:
    require_dtypes(_DTYPES, x=x)
    if TRITON_INTERPRET and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise Unsupported("Triton's interpreter computes bfloat16 incorrectly")


def _nf4_args(weight, absmax, code, blocksize, in_features):
    """Kernel arguments and constants for W: dummy pointers for the unused NF4 arguments of a dense W;
    ``NF4_ALIGNED`` when every W row is whole QBLOCKs (structured tile loads)."""
    if absmax is None:
        return (weight, weight, weight), dict(NF4=False, NF4_ALIGNED=False, QBLOCK=1)
    return (weight.reshape(-1), absmax, code), dict(NF4=True, NF4_ALIGNED=in_features % blocksize == 0,
                                                   QBLOCK=blocksize)


def _interp_cfg(m, n, k):
    return {"BLOCK_M": _pow2(m, 16, 64), "BLOCK_N": _pow2(n, 16, 128), "BLOCK_K": _pow2(k, 16, 128), "GROUP_M": 4}


def _xa(x, lora_A, dropout_p, seed, precision):
    m, k = x.shape
    r = lora_A.shape[0]
    xa = torch.empty((m, r), device=x.device, dtype=torch.float32)
    bm, bk = (_pow2(m, 16, 64), _pow2(k, 16, 128)) if TRITON_INTERPRET else (XA_BLOCK_M, XA_BLOCK_K[x.dtype])
    br = _block_r(r, x.dtype)
    lora_xa_kernel[(triton.cdiv(m, bm), triton.cdiv(r, br))](
        x, lora_A, xa, m, k, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1),
        seed, dropout_p, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br,
        num_warps=4, num_stages=3)
    return xa


def lora_fwd(x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """See :func:`llmkern.reference.lora.lora_fwd`."""
    _check_supported(x)
    with device_guard(x):
        return _fwd(x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed)


def lora_bwd(dy, x, weight, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
    """See :func:`llmkern.reference.lora.lora_bwd`."""
    _check_supported(x)
    with device_guard(x):
        return _bwd(dy, x, weight, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx)


def _fwd(x, weight, absmax, code, blocksize, lora_A, lora_B, bias, scaling, dropout_p, seed):
    m, k = x.shape
    n, r = lora_B.shape
    precision = _precision(x.dtype)
    xa = _xa(x, lora_A, dropout_p, seed, precision)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    (w, am, cd), w_consts = _nf4_args(weight, absmax, code, blocksize, k)
    # W_op[k, n] = W[n, k]: element-index strides of the row-major W for NF4, tensor strides for dense.
    stride_wk, stride_wn = (1, k) if w_consts["NF4"] else (weight.stride(1), weight.stride(0))
    args = (x, w, am, cd, xa, lora_B, bias if bias is not None else out, out, m, n, k, r,
            x.stride(0), x.stride(1), stride_wk, stride_wn, xa.stride(0), xa.stride(1),
            lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1),
            float(scaling), triton.next_power_of_2(m))
    consts = dict(**w_consts, HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_R=GEMM_BLOCK_R)
    if TRITON_INTERPRET:
        cfg = _interp_cfg(m, n, k)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        lora_fwd_kernel[grid](*args, **consts, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _fwd_tuned[grid](*args, **consts)
    return out, xa


def _bwd(dy, x, weight, absmax, code, blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
    m, k = x.shape
    n, r = lora_B.shape
    precision = _precision(x.dtype)
    br = _block_r(r, x.dtype)

    # g = dY B and the per-row-block partials of dB = s * dY^T xa.
    if TRITON_INTERPRET:
        bm_dy, bn_dy = _pow2(m, 16, 64), _pow2(n, 16, 128)
    else:
        bm_dy, bn_dy = _dy_block_ms(x.dtype)[0 if m <= 8192 else -1], DY_BLOCK_N[x.dtype]
    g = torch.empty((m, r), device=x.device, dtype=torch.float32)
    dbp = torch.empty((triton.cdiv(m, bm_dy), n, r), device=x.device, dtype=torch.float32)
    lora_bwd_dy_kernel[(triton.cdiv(m, bm_dy), triton.cdiv(r, br))](
        dy, lora_B, xa, g, dbp, m, n, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
        g.stride(0), g.stride(1), dbp.stride(0), dbp.stride(1), dbp.stride(2),
        PRECISION=precision, BLOCK_M=bm_dy, BLOCK_N=bn_dy, BLOCK_R=br,
        num_warps=_dy_warps(bm_dy), num_stages=3)
    d_b = (dbp.sum(0) * scaling).to(lora_B.dtype)

    # dX = dY W + D(s * g A) and the per-row-block partials of dA = s * g^T D(x).
    cfg = _interp_cfg(m, k, n) if TRITON_INTERPRET else None
    if cfg:
        bm_dx = cfg["BLOCK_M"]
    else:  # the BLOCK_M that every candidate _prune_dx keeps for this call has
        bm_dx = DX_CONFIGS[_family(x.dtype, absmax is not None), _device_arch(x)][0].kwargs["BLOCK_M"]
    dap = torch.empty((triton.cdiv(m, bm_dx), r, k), device=x.device, dtype=torch.float32)
    dx = torch.empty((m, k), device=x.device, dtype=x.dtype) if need_dx else x.new_empty(0)
    dx_arg = dx if need_dx else dap
    (w, am, cd), w_consts = _nf4_args(weight, absmax, code, blocksize, k)
    # W_op[j, c] = W[j, c] (j over out_features, the reduction; c over in_features, the columns of dX).
    stride_wk, stride_wn = (k, 1) if w_consts["NF4"] else (weight.stride(0), weight.stride(1))
    args = (dy, w, am, cd, g, lora_A, x, dx_arg, dap, m, k, n, r,
            dy.stride(0), dy.stride(1), stride_wk, stride_wn, g.stride(0), g.stride(1),
            lora_A.stride(0), lora_A.stride(1), x.stride(0), x.stride(1),
            dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
            dap.stride(0), dap.stride(1), dap.stride(2),
            float(scaling), seed, dropout_p, 1.0 / (1.0 - dropout_p), triton.next_power_of_2(m))
    consts = dict(**w_consts, COMPUTE_DX=need_dx, HAS_DROPOUT=dropout_p > 0.0,
                  PRECISION=precision, BLOCK_R=GEMM_BLOCK_R)
    if TRITON_INTERPRET:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"]),)
        lora_bwd_dx_kernel[grid](*args, **consts, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
        _dx_tuned[grid](*args, **consts)
    d_a = (dap.sum(0) * (scaling / (1.0 - dropout_p))).to(lora_A.dtype)
    return dx, d_a, d_b


def aot_specs() -> list[AotSpec]:
    """Default configurations, for contiguous inputs (unit innermost strides are compile-time constants, as
    Triton specializes them at launch): every autotune candidate of the two GEMM kernels for fp16, bf16
    and fp32, dense and NF4 W (whole-block rows), and the fixed xa / dy kernel configurations.

    The dX candidates come in per-architecture lists; a spec named ``sm90 list`` is launched on sm_90
    and newer only (compiled for sm_80 it spills, which is why sm_80 has its own list)."""
    specs: list[AotSpec] = []
    unit = {
        lora_fwd_kernel: ("stride_xk", "stride_wk", "stride_br", "stride_xar", "stride_on"),
        lora_bwd_dx_kernel: ("stride_dyk", "stride_wn", "stride_gr", "stride_an", "stride_xn", "stride_dxn",
                             "stride_dapn"),
        lora_xa_kernel: ("stride_xk", "stride_ak", "stride_xar"),
        lora_bwd_dy_kernel: ("stride_dyn", "stride_br", "stride_xar", "stride_gr", "stride_dbpr"),
    }
    scalars = {"scaling": "fp32", "dropout_p": "fp32", "dropout_scale": "fp32"}

    def spec(name, fn, ptrs, constants, num_warps=4, num_stages=3, autotune=False):
        consts = dict(constants, **{s: 1 for s in unit[fn]})
        sig = {p: ptrs.get(p) or scalars.get(p, "i32") for p in fn.arg_names if p not in consts}
        return AotSpec(name=name, fn=fn, signature=sig, constants=consts, num_warps=num_warps, num_stages=num_stages,
                       autotune=autotune)

    def tile(c):
        kw = c.kwargs
        return f"BM={kw['BLOCK_M']}, BN={kw['BLOCK_N']}, BK={kw['BLOCK_K']}, BR={GEMM_BLOCK_R}"

    for t in ("fp16", "bf16", "fp32"):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[t]
        for nf4 in (False, True):
            family = _family(dtype, nf4)
            w_t = "*u8" if nf4 else f"*{t}"
            w_consts = dict(NF4=nf4, NF4_ALIGNED=nf4, QBLOCK=64, PRECISION="ieee", BLOCK_R=GEMM_BLOCK_R)
            ptrs = {"x_ptr": f"*{t}", "w_ptr": w_t, "absmax_ptr": "*fp32", "code_ptr": "*fp32", "xa_ptr": "*fp32",
                    "b_ptr": f"*{t}", "bias_ptr": f"*{t}", "out_ptr": f"*{t}"}
            for c in FWD_CONFIGS[family]:
                specs.append(spec(f"lora_fwd[{t}, nf4={nf4}, {tile(c)}]", lora_fwd_kernel, ptrs,
                                  dict(w_consts, HAS_BIAS=True, **c.kwargs), c.num_warps, c.num_stages, autotune=True))
            ptrs = {"dy_ptr": f"*{t}", "w_ptr": w_t, "absmax_ptr": "*fp32", "code_ptr": "*fp32", "g_ptr": "*fp32",
                    "a_ptr": f"*{t}", "x_ptr": f"*{t}", "dx_ptr": f"*{t}", "dap_ptr": "*fp32"}
            for arch in (80, 90) if DX_CONFIGS[family, 80] is not DX_CONFIGS[family, 90] else (80,):
                for c in DX_CONFIGS[family, arch]:
                    specs.append(spec(f"lora_bwd_dx[{t}, nf4={nf4}, sm{arch} list, {tile(c)}]", lora_bwd_dx_kernel,
                                      ptrs, dict(w_consts, COMPUTE_DX=True, HAS_DROPOUT=True, **c.kwargs),
                                      c.num_warps, c.num_stages, autotune=True))
        for br in (16, _block_r(64, dtype)) if dtype != torch.float32 else (16,):
            specs.append(spec(
                f"lora_xa[{t}, BM={XA_BLOCK_M}, BK={XA_BLOCK_K[dtype]}, BR={br}]", lora_xa_kernel,
                {"x_ptr": f"*{t}", "a_ptr": f"*{t}", "xa_ptr": "*fp32"},
                dict(HAS_DROPOUT=True, PRECISION="ieee", BLOCK_M=XA_BLOCK_M, BLOCK_K=XA_BLOCK_K[dtype], BLOCK_R=br)))
            for bm in _dy_block_ms(dtype):
                specs.append(spec(
                    f"lora_bwd_dy[{t}, BM={bm}, BN={DY_BLOCK_N[dtype]}, BR={br}]", lora_bwd_dy_kernel,
                    {"dy_ptr": f"*{t}", "b_ptr": f"*{t}", "xa_ptr": "*fp32", "g_ptr": "*fp32", "dbp_ptr": "*fp32"},
                    dict(PRECISION="ieee", BLOCK_M=bm, BLOCK_N=DY_BLOCK_N[dtype], BLOCK_R=br), num_warps=_dy_warps(bm)))
    return specs
