"""Launchers of the flash-attention kernels (llmkern.kernels.attention): allocation, grids, strides, configs.

Implements the contract of :mod:`llmkern.reference.attention` for float16/bfloat16/float32 (float64
raises :class:`Unsupported`: it runs on the reference). Inputs are read through their strides
(no copies); the mask is streamed through the strides of its expanded view.

Configs: on a GPU each kernel is autotuned over a small list per head-dim class (``PLAIN_TABLE``, or
``MASKED_TABLE`` with a mask or dropout; all spill-free on sm_80 and sm_90), keyed on the head dims,
the mask/causal/dropout kind and power-of-two buckets of Lq and Lk; ``LLMKERN_AUTOTUNE=0`` runs
each list's default (first) config instead. In Triton's interpreter a single small config runs (the
autotuner cannot benchmark there; with one config it does not try).

Decode (flash-decoding): when the query tiles of all (batch, head) pairs cannot fill the GPU
(short Lq, e.g. one token against a KV cache), the keys are split across programs and a combine
kernel merges the partial results; :func:`num_splits` makes the choice.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from llmkern.backends import TRITON_INTERPRET, Unsupported
from llmkern.backends.triton._aot import AotSpec
from llmkern.backends.triton._launch import device_guard
from llmkern.kernels.attention import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_bwd_preprocess_kernel,
    attention_combine_kernel,
    attention_fwd_kernel,
)
from llmkern.reference.attention import empty_out

LOG2E = 1.4426950408889634
MAX_GRID_Y = 65535
# Decode path: query tile height, the longest Lq it serves, the keys per split are a multiple of
# SPLIT_ALIGN (every decode config's BLOCK_N divides it) and at least SPLIT_MIN_KEYS.
DECODE_BLOCK_M = 16
DECODE_MAX_LQ = 64
SPLIT_ALIGN = 128
SPLIT_MIN_KEYS = 64 if TRITON_INTERPRET else 512
MAX_SPLITS = 128
INTERPRETER_SMS = 8  # what the split heuristic assumes in the interpreter (there is no GPU to fill)
PREPROCESS_BLOCK_M = 32
# LLMKERN_AUTOTUNE=0 launches each kernel variant's default config instead of autotuning (read at import).
AUTOTUNE = os.environ.get("LLMKERN_AUTOTUNE", "1") != "0"

_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "DROPOUT", "Lq_key", "Lk_key"]


def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# GPU configs per head-dim class (the larger padded head dim of E, Ev, at least 64), as
# (BLOCK_M, BLOCK_N, warps, stages). The first entry of each list is the default, launched alone when
# LLMKERN_AUTOTUNE=0: it compiles for sm_80 and sm_90 without register spills even without alignment
# information (a stride that is not a multiple of 16 elements). The others are autotuning candidates,
# spill-free on both targets with the 16-aligned pointers and strides that Triton specialises at run
# time. A user mask or dropout costs registers (mask tiles, Philox state), so kernels with either use
# MASKED_TABLE, checked with causal + boolean mask + dropout together.
PLAIN_TABLE = {
    "fwd": {64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
            128: [(64, 32, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
            256: [(32, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 1), (32, 32, 4, 2)]},
    "decode": {64: [(DECODE_BLOCK_M, 32, 4, 2), (DECODE_BLOCK_M, 64, 4, 3), (DECODE_BLOCK_M, 128, 4, 2)],
               128: [(DECODE_BLOCK_M, 32, 4, 2), (DECODE_BLOCK_M, 64, 4, 3), (DECODE_BLOCK_M, 128, 4, 2)],
               256: [(DECODE_BLOCK_M, 16, 4, 2), (DECODE_BLOCK_M, 32, 4, 3), (DECODE_BLOCK_M, 64, 4, 2)]},
    "dkdv": {64: [(16, 64, 4, 2), (32, 128, 8, 2), (16, 128, 4, 2), (32, 64, 4, 2)],
             128: [(32, 16, 8, 1), (32, 64, 8, 2), (16, 128, 8, 2), (16, 64, 8, 2), (32, 32, 4, 2)],
             256: [(16, 16, 8, 1), (32, 32, 8, 2), (16, 32, 4, 2)]},
    "dq": {64: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
           128: [(32, 32, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
           256: [(16, 16, 4, 1), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)]},
}
MASKED_TABLE = {
    "fwd": {64: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
            128: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
            256: [(16, 16, 4, 2), (32, 32, 8, 2), (32, 32, 8, 1), (16, 32, 4, 2)]},
    "decode": {64: [(DECODE_BLOCK_M, 32, 4, 3), (DECODE_BLOCK_M, 64, 4, 3)],
               128: [(DECODE_BLOCK_M, 16, 4, 2), (DECODE_BLOCK_M, 64, 4, 3), (DECODE_BLOCK_M, 32, 4, 3)],
               256: [(DECODE_BLOCK_M, 16, 8, 2), (DECODE_BLOCK_M, 32, 4, 3), (DECODE_BLOCK_M, 32, 4, 2)]},
    "dkdv": {64: [(32, 32, 8, 2), (32, 32, 8, 1), (16, 32, 8, 1)],
             128: [(32, 16, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1)],
             256: [(16, 16, 8, 1), (32, 16, 8, 1)]},
    "dq": {64: [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 1)],
           128: [(32, 32, 8, 2), (64, 32, 8, 2), (16, 32, 4, 1)],
           256: [(16, 16, 4, 1), (32, 32, 8, 1), (16, 32, 4, 1)]},
}
# The interpreter runs one small config per kernel (it cannot benchmark), BLOCK_M != BLOCK_N so that
# the tests cover the causal tile bookkeeping of unequal tiles.
INTERPRETER_TABLE = {"fwd": (64, 32, 4, 1), "decode": (DECODE_BLOCK_M, 32, 4, 1), "dkdv": (32, 64, 4, 1),
                     "dq": (64, 32, 4, 1)}


def block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (tl.dot's minimum K); masks cover the padding."""
    return max(16, triton.next_power_of_2(head_dim))


def _head_class(named) -> int:
    return max(64, named["BLOCK_D"], named["BLOCK_DV"])


def _listed(table: dict, kind: str, head_class: int) -> list:
    """The configs of one kernel variant: the default alone when autotuning is off."""
    entries = table[kind][head_class]
    return entries if AUTOTUNE else entries[:1]


def _candidates(kind: str) -> list:
    if TRITON_INTERPRET:
        return [_config(*INTERPRETER_TABLE[kind])]
    entries = {e for table in (PLAIN_TABLE, MASKED_TABLE) for c in table[kind] for e in _listed(table, kind, c)}
    return [_config(*entry) for entry in sorted(entries)]


def _table(named) -> dict:
    return MASKED_TABLE if named["MASK_KIND"] != 0 or named["DROPOUT"] else PLAIN_TABLE


def _prune(kind: str):
    """Keep the configs listed for the kernel variant and head-dim class; short query sequences drop
    BLOCK_M > 64 (unless that leaves none)."""
    def prune(configs, named_args, **kwargs):
        named = {**named_args, **kwargs}
        listed = set(_listed(_table(named), kind, _head_class(named)))
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in listed]
        if named["Lq_key"] <= 64:
            kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64] or kept
        return kept
    return prune


def _autotuned(kind: str, kernel):
    if TRITON_INTERPRET:
        return triton.autotune(_candidates(kind), key=_KEY)(kernel)
    return triton.autotune(_candidates(kind), key=_KEY, prune_configs_by={"early_config_prune": _prune(kind)})(kernel)


_fwd = _autotuned("fwd", attention_fwd_kernel)
_fwd_split = _autotuned("decode", attention_fwd_kernel)
_dkdv = _autotuned("dkdv", attention_bwd_dkdv_kernel)
_dq = _autotuned("dq", attention_bwd_dq_kernel)


def _bucket(n: int) -> int:
    """Autotuning key of a length: its power-of-two bucket (capped), so nearby lengths share a tuning."""
    return min(triton.next_power_of_2(max(n, 1)), 16384)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, heads: int, lq: int, lk: int, sm_count: int) -> int:
    """How many key splits the forward uses: 1 (plain kernel) unless Lq <= DECODE_MAX_LQ and the
    (batch, head, query-tile) programs are fewer than the SMs; then enough splits to fill about two
    waves, each of at least SPLIT_MIN_KEYS keys."""
    if lq > DECODE_MAX_LQ:
        return 1
    programs = batch * heads * triton.cdiv(lq, DECODE_BLOCK_M)
    if programs >= sm_count:
        return 1
    return max(1, min(triton.cdiv(2 * sm_count, programs), lk // SPLIT_MIN_KEYS, MAX_SPLITS))


def _check(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"the Triton kernels take float16/bfloat16/float32, got {q.dtype}")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        raise Unsupported(f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the grid limit {MAX_GRID_Y}")


def _mask_args(mask, q):
    """(tensor, MASK_KIND, strides) for a (B, H, Lq, Lk) mask view; q stands in when there is no mask."""
    if mask is None:
        return q, 0, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, mask.stride()
    return mask, 2, mask.stride()


def _constants(q, k, v, mask_kind, dropout_p, is_causal):
    e, ev = q.shape[-1], v.shape[-1]
    return dict(HEAD_DIM=e, HEAD_DIM_V=ev, BLOCK_D=block_d(e), BLOCK_DV=block_d(ev), IS_CAUSAL=bool(is_causal),
                MASK_KIND=mask_kind, DROPOUT=dropout_p > 0.0,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def attention_fwd(q, k, v, mask, dropout_p: float, is_causal: bool, scale: float, seed: int):
    _check(q)
    with device_guard(q):
        return _forward(q, k, v, mask, dropout_p, is_causal, scale, seed)


def attention_bwd(dout, q, k, v, out, lse, mask, dropout_p: float, is_causal: bool, scale: float, seed: int):
    _check(q)
    with device_guard(q):
        return _backward(dout, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed)


def _forward(q, k, v, mask, dropout_p, is_causal, scale, seed):
    b, h, lq, _ = q.shape
    h_kv, lk, ev = k.shape[1], k.shape[2], v.shape[-1]
    out = empty_out(q, ev)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    mask_t, mask_kind, mask_strides = _mask_args(mask, q)
    const = _constants(q, k, v, mask_kind, dropout_p, is_causal)
    args = (*q.stride(), *k.stride(), *v.stride(), *mask_strides)
    scalars = (h, h // h_kv, lq, lk)
    tail = (scale * LOG2E, dropout_p, seed, _bucket(lq), _bucket(lk))
    splits = num_splits(b, h, lq, lk, _sm_count(q.device))
    if splits == 1:
        def grid(meta):
            return triton.cdiv(lq, meta["BLOCK_M"]), b * h, 1
        _fwd[grid](q, k, v, mask_t, out, lse, *args, 0, *out.stride(), *scalars, lk, *tail, SPLIT=False, **const)
        return out, lse
    split_size = triton.cdiv(triton.cdiv(lk, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(lk, split_size)
    out_part = torch.empty((splits, b, h, lq, ev), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((splits, b, h, lq), dtype=torch.float32, device=q.device)

    def split_grid(meta):
        return triton.cdiv(lq, meta["BLOCK_M"]), b * h, splits
    _fwd_split[split_grid](q, k, v, mask_t, out_part, lse_part, *args, *out_part.stride(), *scalars, split_size, *tail,
                           SPLIT=True, **const)
    attention_combine_kernel[(lq, b * h)](out_part, lse_part, out, lse, *out.stride(), h, lq, splits,
                                          HEAD_DIM_V=ev, BLOCK_DV=const["BLOCK_DV"],
                                          BLOCK_S=triton.next_power_of_2(splits))
    return out, lse


def _backward(dout, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed):
    b, h, lq, _ = q.shape
    h_kv, lk, ev = k.shape[1], k.shape[2], v.shape[-1]
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_t, mask_kind, mask_strides = _mask_args(mask, q)
    const = _constants(q, k, v, mask_kind, dropout_p, is_causal)
    attention_bwd_preprocess_kernel[(triton.cdiv(lq, PREPROCESS_BLOCK_M), b * h)](
        out, dout, delta, *out.stride(), *dout.stride(), h, lq,
        HEAD_DIM_V=ev, BLOCK_DV=const["BLOCK_DV"], BLOCK_M=PREPROCESS_BLOCK_M)
    args = (q, k, v, mask_t, dout, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride())
    tail = (h, h // h_kv, lq, lk, scale * LOG2E, scale, dropout_p, seed, _bucket(lq), _bucket(lk))

    def grid_n(meta):
        return triton.cdiv(lk, meta["BLOCK_N"]), b * h_kv

    def grid_m(meta):
        return triton.cdiv(lq, meta["BLOCK_M"]), b * h
    _dkdv[grid_n](*args, dk, dv, *strides, *dk.stride(), *dv.stride(), *tail, **const)
    _dq[grid_m](*args, dq, *strides, *dq.stride(), *tail, **const)
    return dq, dk, dv


# Ahead-of-time specs ----------------------------------------------------------------------------------------

_FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p"}
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_gd", "stride_dkd", "stride_dvd",
                 "stride_dqd"}


def _spec(label, fn, config, pointers, constants, autotune):
    """An AotSpec with every runtime argument typed: the given pointers, i64 seed, fp32 scalars, i32 sizes and
    strides; head-dim strides fixed to 1 as Triton specialises them at run time for contiguous rows."""
    params = [p for p in fn.params if not p.is_constexpr]
    signature = {}
    constants = dict(constants)
    for p in params:
        if p.name in constants:
            continue
        if p.name in pointers:
            signature[p.name] = pointers[p.name]
        elif p.name in _UNIT_STRIDES:
            constants[p.name] = 1
        else:
            signature[p.name] = "i64" if p.name == "seed" else "fp32" if p.name in _FLOAT_ARGS else "i32"
    constants.update(config.kwargs)
    tiles = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return AotSpec(name=f"{fn.__name__}[{label}, {tiles}]", fn=fn, signature=signature, constants=constants,
                   num_warps=config.num_warps, num_stages=config.num_stages, autotune=autotune)


def aot_specs() -> list[AotSpec]:
    """Every GPU config in bf16 at the head dim of its class (64, 128, 256): ``PLAIN_TABLE`` with no mask,
    not causal; ``MASKED_TABLE`` with causal + boolean mask (contiguous last dim) + dropout; the first of
    each list is the default, the rest autotune candidates. Plus the combine and backward-preprocess
    kernels (fixed configs)."""
    ptr = "*bf16"
    inputs = {"Q": ptr, "K": ptr, "V": ptr, "Mask": ptr}
    backward = {**inputs, "dOut": ptr, "Lse": "*fp32", "Delta": "*fp32"}
    io = {"fwd": {**inputs, "Out": ptr, "Lse": "*fp32"}, "decode": {**inputs, "Out": "*fp32", "Lse": "*fp32"},
          "dkdv": {**backward, "dK": ptr, "dV": ptr}, "dq": {**backward, "dQ": ptr}}
    kernels = {"fwd": attention_fwd_kernel, "decode": attention_fwd_kernel, "dkdv": attention_bwd_dkdv_kernel,
               "dq": attention_bwd_dq_kernel}
    specs = []
    for masked, table in ((False, PLAIN_TABLE), (True, MASKED_TABLE)):
        for e in (64, 128, 256):
            const = dict(HEAD_DIM=e, HEAD_DIM_V=e, BLOCK_D=block_d(e), BLOCK_DV=block_d(e), IS_CAUSAL=masked,
                         MASK_KIND=1 if masked else 0, DROPOUT=masked, DOT_PRECISION="tf32")
            if masked:  # a materialised mask: its last dim is contiguous, which Triton specialises
                const["stride_mn"] = 1
            label = f"E={e}" + (", causal, bool mask, dropout" if masked else "")
            for kind, fn in kernels.items():
                extra = {"SPLIT": kind == "decode"} if fn is attention_fwd_kernel else {}
                pointers = {**io[kind], **({"Mask": "*u8"} if masked else {})}
                for i, entry in enumerate(table[kind][e]):
                    specs.append(_spec(f"{kind}, {label}", fn, _config(*entry), pointers, {**const, **extra},
                                       autotune=i > 0))
    for e in (64, 128, 256):
        specs.append(AotSpec(
            name=f"attention_combine_kernel[E={e}]", fn=attention_combine_kernel,
            signature={"OutPart": "*fp32", "LsePart": "*fp32", "Out": ptr, "Lse": "*fp32", "stride_ob": "i32",
                       "stride_oh": "i32", "stride_om": "i32", "H": "i32", "Lq": "i32", "n_splits": "i32"},
            constants={"stride_od": 1, "HEAD_DIM_V": e, "BLOCK_DV": block_d(e), "BLOCK_S": MAX_SPLITS}, num_warps=4))
        specs.append(AotSpec(
            name=f"attention_bwd_preprocess_kernel[E={e}]", fn=attention_bwd_preprocess_kernel,
            signature={"Out": ptr, "dOut": ptr, "Delta": "*fp32", "stride_ob": "i32", "stride_oh": "i32",
                       "stride_om": "i32", "stride_gb": "i32", "stride_gh": "i32", "stride_gm": "i32",
                       "H": "i32", "Lq": "i32"},
            constants={"stride_od": 1, "stride_gd": 1, "HEAD_DIM_V": e, "BLOCK_DV": block_d(e),
                       "BLOCK_M": PREPROCESS_BLOCK_M}, num_warps=4))
    return specs
