"""Scaled dot-product attention on every backend against the fp64 reference (DESIGN.md numerics rule).

The baseline of the rule is the reference run in the test dtype without upcasting (plain torch
ops in fp16/bf16/fp32, i.e. PyTorch's own same-dtype attention); the reference itself is checked
against ``torch.nn.functional.scaled_dot_product_attention``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.reference import attention as ref
from tests._numerics import assert_close, assert_kernel_close

sdpa = llmkern.ops.scaled_dot_product_attention


def _skip_dtype(backend, dtype):
    if dtype == torch.bfloat16 and backend.interpreted:
        pytest.skip("the Triton interpreter cannot compute bfloat16")


def _randn(backend, *shape, dtype):
    return torch.randn(*shape, device=backend.device, dtype=dtype)


def _qkv(backend, b, h, h_kv, lq, lk, e, ev, dtype, layout="bhle"):
    """q, k, v in a layout: "bhle" contiguous, "blhe" (B, L, H, E) viewed as (B, H, L, E), "packed" slices of
    one (B, L, H + 2 H_kv, E) projection, "strided" a last-dim stride of 2."""
    if layout == "bhle":
        return (_randn(backend, b, h, lq, e, dtype=dtype), _randn(backend, b, h_kv, lk, e, dtype=dtype),
                _randn(backend, b, h_kv, lk, ev, dtype=dtype))
    if layout == "blhe":
        return (_randn(backend, b, lq, h, e, dtype=dtype).transpose(1, 2),
                _randn(backend, b, lk, h_kv, e, dtype=dtype).transpose(1, 2),
                _randn(backend, b, lk, h_kv, ev, dtype=dtype).transpose(1, 2))
    if layout == "packed":
        assert lq == lk and e == ev, "packed layout needs one length and one head dim"
        qkv = _randn(backend, b, lq, h + 2 * h_kv, e, dtype=dtype)
        q, k, v = qkv.split([h, h_kv, h_kv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layout == "strided":
        return (_randn(backend, b, h, lq, 2 * e, dtype=dtype)[..., ::2], _randn(backend, b, h_kv, lk, 2 * e, dtype=dtype)[..., ::2],
                _randn(backend, b, h_kv, lk, 2 * ev, dtype=dtype)[..., ::2])
    raise ValueError(layout)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _check_against_reference(q, k, v, call, dout=None, **kwargs):
    """Run ``call(q, k, v)`` (the backend under test) and the reference (fp64 and same-dtype baseline) with
    the same arguments; compare the output and dq, dk, dv with the numerics rule. Returns the output."""
    leaves = _leaves((q, k, v))
    out = call(*leaves)
    if dout is None:
        dout = torch.randn_like(out)
    out.backward(dout)
    exact = _leaves((q, k, v), torch.float64)
    out_ref = ref.scaled_dot_product_attention(*exact, upcast=True, **kwargs)
    out_ref.backward(dout.double())
    base = _leaves((q, k, v))
    out_base = ref.scaled_dot_product_attention(*base, upcast=False, **kwargs)
    out_base.backward(dout)
    assert_kernel_close(out, out_ref, out_base, name="out")
    for name, a, r, bl in zip(("dq", "dk", "dv"), leaves, exact, base):
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, f"{name}: {a.grad.dtype} {tuple(a.grad.shape)}"
        assert_kernel_close(a.grad, r.grad, bl.grad, name=name)
    return out


# (B, H, H_kv, Lq, Lk, E, Ev, causal): odd lengths, Lq != Lk, head dims 8..256 incl. non-powers of two, GQA, MQA.
CASES = [
    (2, 2, 2, 1, 17, 16, 16, False),
    (1, 2, 2, 17, 33, 8, 8, True),
    (1, 2, 2, 17, 17, 64, 64, True),
    (1, 2, 2, 128, 129, 80, 80, False),
    (1, 2, 2, 129, 128, 128, 128, True),
    (1, 1, 1, 300, 129, 256, 256, True),
    (1, 8, 2, 129, 300, 64, 64, False),
    (1, 4, 1, 300, 17, 32, 32, True),
    (1, 2, 2, 17, 300, 96, 64, False),
    (1, 1, 1, 17, 129, 160, 160, False),
    (1, 2, 1, 129, 17, 192, 192, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}-q{}k{}-E{}v{}-{}".format(*c[:7], "causal" if c[7] else "full"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(backend, case, dtype):
    _skip_dtype(backend, dtype)
    b, h, h_kv, lq, lk, e, ev, causal = case
    q, k, v = _qkv(backend, b, h, h_kv, lq, lk, e, ev, dtype, layout="blhe")
    gqa = h != h_kv
    out = _check_against_reference(
        q, k, v, lambda q, k, v: sdpa(q, k, v, is_causal=causal, enable_gqa=gqa), is_causal=causal, enable_gqa=gqa)
    assert out.shape == (b, h, lq, ev) and out.dtype == dtype


@pytest.mark.parametrize("layout", ["bhle", "packed", "strided"])
def test_any_strides(backend, layout):
    q, k, v = _qkv(backend, 2, 4, 2, 33, 33, 32, 32, torch.float32, layout=layout)
    dout = torch.randn(2, 33, 4, 32, device=backend.device).transpose(1, 2)  # a non-contiguous gradient too
    _check_against_reference(q, k, v, lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True), dout=dout,
                             is_causal=True, enable_gqa=True)


def test_output_layout(backend):
    q, k, v = _qkv(backend, 2, 3, 3, 5, 7, 16, 16, torch.float32)
    out = sdpa(q, k, v)
    assert out.transpose(1, 2).is_contiguous(), f"out strides {out.stride()}: expected (B, Lq, H, Ev) memory"


def _bool_mask(backend, shape, dead_rows=()):
    mask = torch.rand(shape, device=backend.device) > 0.4
    for row in dead_rows:
        mask[..., row, :] = False
    return mask


def _float_mask(backend, shape, dead_rows=()):
    bias = torch.randn(shape, device=backend.device)
    bias = bias.masked_fill(torch.rand(shape, device=backend.device) < 0.3, float("-inf"))
    for row in dead_rows:
        bias[..., row, :] = float("-inf")
    return bias


MASK_CASES = [  # (mask kind, mask shape given (B, H, Lq, Lk) = (2, 4, 33, 129), causal)
    ("bool", (33, 129), False),
    ("bool", (2, 1, 1, 129), False),  # padding mask
    ("float", (1, 4, 33, 129), False),
    ("float", (2, 4, 33, 129), True),
    ("bool", (2, 1, 33, 129), True),
]


@pytest.mark.parametrize("kind, shape, causal", MASK_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_masks(backend, kind, shape, causal, dtype):
    _skip_dtype(backend, dtype)
    b, h, h_kv, lq, lk, e = 2, 4, 2, 33, 129, 32
    dead = (3, 32) if shape[-2] == lq else ()
    mask = (_bool_mask if kind == "bool" else _float_mask)(backend, shape, dead)
    if kind == "float":
        mask = mask.to(dtype)
    q, k, v = _qkv(backend, b, h, h_kv, lq, lk, e, e, dtype)
    out = _check_against_reference(
        q, k, v, lambda q, k, v: sdpa(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True),
        attn_mask=mask, is_causal=causal, enable_gqa=True)
    for row in dead:  # fully hidden rows: zeros (FlashAttention's convention), not NaN
        assert bool((out[..., row, :] == 0).all()), f"row {row} of a fully masked query is not zero"


def test_fully_masked_rows_zero_output_grad_and_inf_lse(backend):
    q, k, v = _leaves(_qkv(backend, 1, 2, 2, 17, 40, 16, 16, torch.float32))
    mask = torch.ones(17, 40, dtype=torch.bool, device=backend.device)
    mask[5] = False
    out, lse = torch.ops.llmkern.attention_fwd(q, k, v, mask.expand(1, 2, 17, 40), 0.0, False, 0.25, None)
    out.sum().backward()
    assert bool((out[:, :, 5] == 0).all()) and bool(torch.isfinite(out).all())
    assert bool(torch.isposinf(lse[:, :, 5]).all()), f"lse of the masked row: {lse[:, :, 5]}"
    assert bool(torch.isfinite(lse[:, :, :5]).all())
    assert bool((q.grad[:, :, 5] == 0).all()) and bool(torch.isfinite(q.grad).all())
    assert bool(torch.isfinite(k.grad).all()) and bool(torch.isfinite(v.grad).all())
    _, ref_lse = ref.attention_fwd(q.detach(), k.detach(), v.detach(), mask.expand(1, 2, 17, 40), 0.0, False, 0.25, 0)
    assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5, name="lse")


def test_scale(backend):
    q, k, v = _qkv(backend, 1, 2, 2, 17, 33, 48, 48, torch.float32)
    _check_against_reference(q, k, v, lambda q, k, v: sdpa(q, k, v, scale=0.3), scale=0.3)


def test_decode_split_keys(backend):
    """One and a few query rows against many keys: the Triton backend splits the keys (flash-decoding)."""
    from llmkern.backends.triton import attention as triton_attention

    b, h, h_kv, e = 1, 2, 1, 64
    lk = 2 * triton_attention.SPLIT_MIN_KEYS + 45
    sms = triton_attention._sm_count(backend.device) if backend.name == "triton" else triton_attention.INTERPRETER_SMS
    for lq, causal, masked in ((1, False, False), (19, True, True)):
        if backend.name == "triton":
            assert triton_attention.num_splits(b, h, lq, lk, sms) > 1, "the decode shape should take the split path"
        q, k, v = _qkv(backend, b, h, h_kv, lq, lk, e, e, torch.float32, layout="blhe")
        mask = _bool_mask(backend, (b, 1, lq, lk), dead_rows=(2,)) if masked else None
        _check_against_reference(
            q, k, v, lambda q, k, v: sdpa(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True),
            attn_mask=mask, is_causal=causal, enable_gqa=True)


def test_num_splits_heuristic():
    from llmkern.backends.triton.attention import DECODE_MAX_LQ, SPLIT_MIN_KEYS, num_splits

    assert num_splits(1, 8, 1, 64 * SPLIT_MIN_KEYS, 132) > 1
    assert num_splits(1, 8, DECODE_MAX_LQ + 1, 64 * SPLIT_MIN_KEYS, 132) == 1  # prefill: plain kernel
    assert num_splits(64, 32, 1, 64 * SPLIT_MIN_KEYS, 132) == 1  # enough (batch, head) programs already
    assert num_splits(1, 8, 1, SPLIT_MIN_KEYS - 1, 132) == 1  # too few keys to split


# Dropout ---------------------------------------------------------------------------------------------------

def test_philox_known_answers():
    """The reference RNG is Philox-4x32-10 (Random123 known-answer vectors), the generator of tl.rand."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in vectors:
        got = ref.philox(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
        assert [int(g) for g in got] == list(expected), f"philox{counter, key} = {[hex(int(g)) for g in got]}"


def _dropout_probe(backend, seed, p, b=2, h=2, lq=64, lk=64):
    """Run attention with V = identity so that out = P * Z / (1 - p) exposes the keep mask Z."""
    q = _randn(backend, b, h, lq, 16, dtype=torch.float32)
    k = _randn(backend, b, h, lk, 16, dtype=torch.float32)
    v = torch.eye(lk, device=backend.device).expand(b, h, lk, lk)
    out, _ = torch.ops.llmkern.attention_fwd(q, k, v, None, p, False, 0.25, torch.tensor(seed))
    p_ref, _ = ref._softmax(ref._scores(q, k, None, False, 0.25))
    return out, p_ref


NO_DROPOUT_ON_CPU = pytest.mark.filterwarnings("ignore:llmkern.attention_.*no dropout:RuntimeWarning")


@NO_DROPOUT_ON_CPU
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics_and_expectation(backend, p):
    seed = 1234567890123
    out, probs = _dropout_probe(backend, seed, p)
    kept = out != 0
    keep_rate = kept.float().mean().item()
    n = kept.numel()
    assert abs(keep_rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {keep_rate} for p={p}"
    assert bool((kept == ref.dropout_keep(seed, tuple(out.shape), p, out.device)).all()), "mask differs from the reference's"
    assert_close(out[kept], (probs / (1 - p))[kept], atol=1e-6, rtol=1e-5, name="kept probabilities scaled by 1/(1-p)")
    # E[out] = P: the row sums of P * Z / (1 - p) average to 1
    row_sums = out.sum(-1)
    assert abs(row_sums.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / row_sums.numel()), f"mean row sum {row_sums.mean()}"


@NO_DROPOUT_ON_CPU
def test_dropout_reproducible(backend):
    q, k, v = _qkv(backend, 1, 2, 2, 17, 33, 16, 16, torch.float32)
    torch.manual_seed(7)
    a = sdpa(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    b = sdpa(q, k, v, dropout_p=0.3)
    c = sdpa(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b), "same torch seed must give the same dropout mask"
    assert not torch.equal(a, c), "a new draw must give a different dropout mask"


@NO_DROPOUT_ON_CPU
@pytest.mark.parametrize("causal, masked, gqa", [(False, False, False), (True, True, True)])
def test_dropout_gradients_match_reference(backend, causal, masked, gqa):
    seed, p = 987654321, 0.2
    h_kv = 1 if gqa else 2
    q, k, v = _qkv(backend, 2, 2, h_kv, 33, 47, 32, 32, torch.float32)
    mask = _bool_mask(backend, (2, 1, 33, 47), dead_rows=(4,)) if masked else None
    full = None if mask is None else mask.expand(2, 2, 33, 47)

    def call(q, k, v):
        return torch.ops.llmkern.attention_fwd(q, k, v, full, p, causal, 1 / math.sqrt(32), torch.tensor(seed))[0]

    _check_against_reference(q, k, v, call, attn_mask=mask, dropout_p=p, is_causal=causal, enable_gqa=gqa, seed=seed)


# The reference is the spec: it must agree with torch ------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch(causal):
    q, k, v = (torch.randn(2, 4, 9, 16, dtype=torch.float64), torch.randn(2, 2, 13, 16, dtype=torch.float64),
               torch.randn(2, 2, 13, 24, dtype=torch.float64))
    for mask in (None, torch.rand(9, 13) > 0.3, torch.randn(2, 1, 9, 13, dtype=torch.float64)):
        if mask is not None and mask.dtype == torch.bool:
            mask[:, 0] = True  # torch's math path gives NaN for fully masked rows; compare the defined part
        if causal and mask is not None:
            continue  # torch rejects is_causal together with attn_mask
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True)
        got = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True)
        assert_close(got, want, atol=1e-12, rtol=1e-12, name=f"reference vs torch (mask {None if mask is None else mask.dtype})")


# Custom-op plumbing ------------------------------------------------------------------------------------------

@NO_DROPOUT_ON_CPU
def test_opcheck(backend):
    q, k, v = _leaves(_qkv(backend, 1, 2, 1, 17, 17, 16, 16, torch.float32, layout="blhe"))
    mask = (torch.rand(17, 17, device=backend.device) > 0.2).expand(1, 2, 17, 17)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, (q, k, v, mask, 0.1, True, 0.25, torch.tensor(3)))
    out, lse = torch.ops.llmkern.attention_fwd(q, k, v, mask, 0.1, True, 0.25, torch.tensor(3))
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask, 0.1, True, 0.25,
                           torch.tensor(3)))


@NO_DROPOUT_ON_CPU
def test_torch_compile_fullgraph(backend):
    q, k, v = _leaves(_qkv(backend, 1, 2, 2, 17, 17, 16, 16, torch.float32))

    def f(q, k, v):
        return sdpa(q, k, v, is_causal=True, dropout_p=0.1).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    compiled(q, k, v).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(3)
    f(q, k, v).backward()
    for name, g, t in zip("qkv", grads, (q, k, v)):
        assert_close(g, t.grad, atol=1e-6, name=f"compiled d{name}")


def test_empty_inputs(backend):
    q, k, v = _leaves(_qkv(backend, 1, 2, 2, 0, 5, 16, 16, torch.float32))
    out = sdpa(q, k, v)
    out.sum().backward()
    assert out.shape == (1, 2, 0, 16) and tuple(k.grad.shape) == (1, 2, 5, 16)
    q, k, v = _qkv(backend, 1, 2, 2, 3, 0, 16, 16, torch.float32)
    assert bool((sdpa(q, k, v) == 0).all()), "no keys: every row is fully masked, so zeros"


@pytest.mark.skipif(llmkern.backends.TRITON_INTERPRET, reason="specs hold @triton.jit functions, not interpreted ones")
def test_aot_specs_cover_every_kernel_argument():
    """Each ahead-of-time spec names every kernel argument once; every kernel variant has one default config."""
    from llmkern.backends.triton.attention import aot_specs

    specs = aot_specs()
    assert {s.fn.__name__ for s in specs} == {"attention_fwd_kernel", "attention_combine_kernel",
                                              "attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel",
                                              "attention_bwd_dq_kernel"}
    for spec in specs:
        names = list(spec.fn.arg_names)
        assert [a for a in names if a not in spec.constants] == list(spec.signature), spec.name
        assert set(spec.constants) | set(spec.signature) == set(names), spec.name
    variants = {}
    for spec in specs:
        variant = spec.name.split(", BLOCK_M")[0]
        variants.setdefault(variant, []).append(spec.autotune)
    assert all(flags.count(False) == 1 for flags in variants.values()), variants


# Bad input ---------------------------------------------------------------------------------------------------

def test_bad_input():
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    op = "scaled_dot_product_attention"
    with pytest.raises(ValueError, match=f"{op}: query must be 4-D, got 3-D"):
        sdpa(q[0], k, v, enable_gqa=True)
    with pytest.raises(TypeError, match=f"{op}: key must have query's dtype"):
        sdpa(q, k.half(), v, enable_gqa=True)
    with pytest.raises(TypeError, match=f"{op}: query must have dtype in"):
        sdpa(q.int(), k, v, enable_gqa=True)
    with pytest.raises(ValueError, match=f"{op}: query, key, value must share the batch size"):
        sdpa(q, torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16), enable_gqa=True)
    with pytest.raises(ValueError, match=f"{op}: value must have key's"):
        sdpa(q, k, torch.randn(1, 2, 6, 16), enable_gqa=True)
    with pytest.raises(ValueError, match=f"{op}: key must have query's head dim 16, got 8"):
        sdpa(q, torch.randn(1, 2, 7, 8), v, enable_gqa=True)
    with pytest.raises(ValueError, match=rf"{op}: the query/key head dim must be in \[1, 256\], got 320"):
        sdpa(torch.randn(1, 2, 5, 320), torch.randn(1, 2, 7, 320), v[:, :2])
    with pytest.raises(ValueError, match=f"{op}: key/value have 2 heads and query 4; pass enable_gqa=True"):
        sdpa(q, k, v)
    with pytest.raises(ValueError, match=f"{op}: query heads \\(4\\) must be a multiple of key/value heads, got 3"):
        sdpa(q, torch.randn(1, 3, 7, 16), torch.randn(1, 3, 7, 16), enable_gqa=True)
    with pytest.raises(ValueError, match=rf"{op}: attn_mask must be broadcastable to \(B, H, Lq, Lk\) = \(1, 4, 5, 7\), got \(5, 6\)"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match=f"{op}: attn_mask must be bool or floating point, got torch.int64"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64), enable_gqa=True)
    with pytest.raises(ValueError, match=f"{op}: attn_mask gets no gradient"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 7, requires_grad=True), enable_gqa=True)
    with pytest.raises(ValueError, match=rf"{op}: dropout_p must be in \[0, 1\), got 1.0"):
        sdpa(q, k, v, dropout_p=1.0, enable_gqa=True)
