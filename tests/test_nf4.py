"""NF4 quantization: bytes identical to bitsandbytes on every backend, QuantState, nf4_linear, LinearNF4."""
from __future__ import annotations

import pytest
import torch

import llmkern
from llmkern import ops
from llmkern.quant_state import QuantState
from llmkern.reference import nf4 as reference
from _numerics import assert_kernel_close

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = reference.BLOCKSIZES
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("normal", "uniform", "heavy", "constant", "zero")


def bnb_quantize(x, blocksize, double_quant):
    """bitsandbytes' CPU quantize_4bit (its dequantize fallback would torch.compile every shape: keep it eager)."""
    with torch._dynamo.config.patch(disable=True):
        return bnbF.quantize_4bit(x.cpu(), blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_dequantize(q, state, dtype):
    state.dtype = dtype
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(q, state, quant_type="nf4")


def sample(kind, shape, dtype, device):
    if kind == "normal":
        x = torch.randn(shape)
    elif kind == "uniform":
        x = torch.rand(shape) * 2 - 1
    elif kind == "heavy":
        x = torch.distributions.StudentT(torch.tensor(1.5)).sample(shape)
    elif kind == "constant":
        x = torch.full(shape, -0.37)
    else:
        x = torch.zeros(shape)
    return x.to(device=device, dtype=dtype)


def assert_state_equals_bnb(ours: QuantState, theirs, double_quant):
    assert torch.equal(ours.absmax.cpu(), theirs.absmax), "absmax differs from bitsandbytes"
    assert ours.nested == double_quant and ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if double_quant:
        assert torch.equal(ours.state2.absmax.cpu(), theirs.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.offset.cpu(), theirs.offset), "offset differs"
        assert torch.equal(ours.state2.code.cpu(), theirs.state2.code), "nested quant_map differs"
    assert torch.equal(ours.code.cpu(), theirs.code)


def check_against_bnb(x, blocksize, double_quant):
    packed, state = ops.nf4_quantize(x, blocksize, double_quant)
    q, bstate = bnb_quantize(x, blocksize, double_quant)
    assert packed.shape == q.shape and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), q), "packed bytes differ from bitsandbytes"
    assert_state_equals_bnb(state, bstate, double_quant)
    out = ops.nf4_dequantize(packed, state, torch.float32)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out.cpu(), bnb_dequantize(q, bstate, torch.float32).reshape(x.shape)), "dequantize differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_dequantize_match_bitsandbytes(backend, blocksize, dtype):
    """Blocks of every input kind and an odd element count (partial last block, padded nibble), both
    stat modes: packed bytes, absmax, nested absmax/offset bit-identical; fp32 dequantization equal."""
    parts = [sample(kind, (2 * blocksize,), dtype, backend.device) for kind in KINDS]
    x = torch.cat(parts + [sample("normal", (blocksize // 2 + 3,), dtype, backend.device)])
    for double_quant in (False, True):
        check_against_bnb(x, blocksize, double_quant)


@pytest.mark.parametrize("kind", ("constant", "zero", "heavy"))
@pytest.mark.parametrize("blocksize", (64, 256))
def test_whole_tensor_kinds_match_bitsandbytes(backend, kind, blocksize):
    """Whole constant / zero tensors (all absmax equal: the nested absmax is 0) and heavy tails, 2-D."""
    for dtype in DTYPES:
        check_against_bnb(sample(kind, (3, blocksize + 3), dtype, backend.device), blocksize, True)


@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("blocksize", (32, 64, 2048))
def test_dequantize_half_dtypes_match_bitsandbytes(backend, blocksize, out_dtype):
    x = torch.randn(5, 2 * blocksize + 7, device=backend.device)
    for double_quant in (False, True):
        packed, state = ops.nf4_quantize(x, blocksize, double_quant)
        q, bstate = bnb_quantize(x, blocksize, double_quant)
        out = ops.nf4_dequantize(packed, state, out_dtype)
        assert out.dtype == out_dtype
        assert torch.equal(out.cpu(), bnb_dequantize(q, bstate, out_dtype))
    assert ops.nf4_dequantize(packed, state).dtype == torch.float32  # default: the quantized tensor's dtype


@pytest.mark.parametrize("n", (1, 2, 7, 63, 65, 1001))
def test_odd_and_tiny_sizes(backend, n):
    x = torch.randn(n, device=backend.device, dtype=torch.bfloat16)
    packed, state = ops.nf4_quantize(x, 64, True)
    q, bstate = bnb_quantize(x, 64, True)
    assert packed.shape == ((n + 1) // 2, 1) and torch.equal(packed.cpu(), q)
    assert_state_equals_bnb(state, bstate, True)
    if n % 2:
        assert int(packed[-1, 0]) & 0xF == reference.NF4_ZERO_CODE  # the padded nibble is the zero code
    # (bitsandbytes transposes the result of a one-byte tensor: compare the values.)
    assert torch.equal(ops.nf4_dequantize(packed, state).cpu(), bnb_dequantize(q, bstate, torch.bfloat16).reshape(n))


def test_ties_go_to_the_lower_code(backend):
    """Values exactly on a midpoint between two NF4 codes take the lower code, as bitsandbytes."""
    bounds = reference.nf4_bounds()
    x = torch.cat([torch.tensor([1.0]), bounds, -bounds.flip(0), torch.zeros(64 - 31)]).to(backend.device)
    packed, _ = ops.nf4_quantize(x, 64, False)
    q, _ = bnb_quantize(x, 64, False)
    assert torch.equal(packed.cpu(), q)
    codes = torch.stack([q.view(-1) >> 4, q.view(-1) & 0xF], 1).view(-1)
    assert codes[1:16].tolist() == list(range(15))


def test_rows_straddling_blocks_decode_by_the_format(backend):
    """A (40, 96) weight with blocksize 64: blocks straddle rows. bitsandbytes 0.50's AVX-512 CPU
    dequantize mis-scales such rows (its CUDA and default paths do not); llmkern decodes every element
    as ``code[nibble] * absmax[i // blocksize]``, computed here from bitsandbytes' own bytes and absmax."""
    w = torch.randn(40, 96)
    q, bstate = bnb_quantize(w, 64, False)
    codes = torch.stack([q.view(-1) >> 4, q.view(-1) & 0xF], 1).view(-1).long()
    expected = (reference.nf4_code()[codes] * bstate.absmax.repeat_interleave(64)).view(40, 96)
    packed, state = ops.nf4_quantize(w.to(backend.device), 64, False)
    assert torch.equal(ops.nf4_dequantize(packed, state).cpu(), expected)


def test_zero_blocks_dequantize_to_zeros(backend):
    x = torch.randn(4, 64, device=backend.device)
    x[1] = 0
    x[3, :] = 0
    for double_quant in (False, True):
        packed, state = ops.nf4_quantize(x, 64, double_quant)
        out = ops.nf4_dequantize(packed, state)
        assert torch.all(out[1] == 0) and torch.all(out[3] == 0)
        assert torch.count_nonzero(out[0]) > 0


def test_quantization_error_is_bounded(backend):
    """NF4 of a normal tensor: |x - dequant(x)| <= half the widest code gap times the block absmax."""
    x = torch.randn(64, 128, device=backend.device)
    packed, state = ops.nf4_quantize(x, 64, False)
    err = (ops.nf4_dequantize(packed, state) - x).abs().view(-1, 64)
    absmax = x.abs().view(-1, 64).amax(1, keepdim=True)
    code = reference.nf4_code()
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    assert torch.all(err <= half_gap * absmax + 1e-6)


# ---- QuantState --------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", (False, True))
def test_quant_state_dict_round_trip_with_bitsandbytes(double_quant):
    x = torch.randn(48, 40)
    packed, state = ops.nf4_quantize(x, 64, double_quant)
    q, bstate = bnb_quantize(x, 64, double_quant)
    theirs = bstate.as_dict(packed=True)
    ours = state.as_dict(packed=True)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key  # even the packed JSON bytes
    assert QuantState.from_dict(theirs).equal(state)
    assert QuantState.from_dict(state.as_dict()).equal(state)
    assert QuantState.from_bnb(bstate).equal(state)
    back = bnbF.QuantState.from_dict(dict(ours), device="cpu")
    assert torch.equal(bnb_dequantize(packed, back, torch.float32), ops.nf4_dequantize(packed, state))
    assert QuantState.from_bnb(state.to_bnb()).equal(state)


@pytest.mark.parametrize("corrupt, match", [
    (lambda d: d.update({"absmax": d["absmax"][:-1]}), "absmax must be"),
    (lambda d: d.update({"nested_absmax": torch.zeros(5)}), "nested_absmax must be"),
    (lambda d: d.update({"quant_map": torch.zeros(16)}), "quant_map must be the 16-entry NF4 table"),
    (lambda d: d.update({"quant_state.bitsandbytes__fp4": d.pop("quant_state.bitsandbytes__nf4")}), "unknown quant type"),
    (lambda d: d.update({"quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 255], dtype=torch.uint8)}), "valid JSON"),
    (lambda d: d.pop("quant_state.bitsandbytes__nf4"), "exactly one"),
    (lambda d: d.pop("absmax"), "missing items"),
    (lambda d: d.update({"bogus": torch.zeros(1)}), "unknown items"),
])
def test_quant_state_from_dict_rejects_corrupt_state(corrupt, match):
    _, state = ops.nf4_quantize(torch.randn(32, 64), 64, True)
    d = state.as_dict(packed=True)
    corrupt(d)
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(d)


def test_quant_state_json_fields_are_checked():
    _, state = ops.nf4_quantize(torch.randn(32, 64), 64, True)
    for field, value, match in (("blocksize", 48, "blocksize must be one of"), ("dtype", "int8", "dtype must be one of"),
                                ("shape", [32, 32], "absmax must be"), ("nested_blocksize", 128, "nested_blocksize")):
        d = state.as_dict()
        d[field] = value
        with pytest.raises(ValueError, match=match):
            QuantState.from_dict(d)


# ---- nf4_linear --------------------------------------------------------------------------------------


def _linear_dtypes(backend):
    # The interpreter's tl.dot is wrong for bf16 operands: test fp16 there.
    return (torch.float32, torch.float16) if backend.interpreted else (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 8, 64), (7, 33, 70), (2, 3, 17, 130), (5, 6, 2080)], ids=str)
@pytest.mark.parametrize("double_quant", (False, True))
def test_nf4_linear_forward_backward(backend, shape, double_quant):
    *lead, out_features, in_features = shape
    w = torch.randn(out_features, in_features, device=backend.device) / in_features ** 0.5
    packed, state = ops.nf4_quantize(w, 64, double_quant)
    w32 = ops.nf4_dequantize(packed, state, torch.float32)
    for dtype in _linear_dtypes(backend):
        x = torch.randn(*lead, in_features, device=backend.device, dtype=dtype, requires_grad=True)
        bias = torch.randn(out_features, device=backend.device, dtype=dtype, requires_grad=True)
        y = ops.nf4_linear(x, packed, state, bias)
        assert y.shape == (*lead, out_features) and y.dtype == dtype
        dy = torch.randn_like(y)
        dx, db = torch.autograd.grad(y, (x, bias), dy)
        x64, dy64, w64 = x.detach().double(), dy.double(), w32.double()
        ref = x64 @ w64.T + bias.detach().double()
        base = torch.nn.functional.linear(x.detach(), w32.to(dtype), bias.detach())
        assert_kernel_close(y, ref, base, name=f"nf4_linear {dtype}")
        assert_kernel_close(dx, dy64 @ w64, dy @ w32.to(dtype), name=f"nf4_linear dx {dtype}")
        assert torch.allclose(db.double(), dy64.reshape(-1, out_features).sum(0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("blocksize", (32, 128, 1024))
def test_nf4_linear_blocksizes_and_long_rows(backend, blocksize):
    """Rows of whole blocks longer than one CPU tile (2048 columns), 9 input rows, 20 outputs."""
    w = torch.randn(20, 2048, device=backend.device) / 2048 ** 0.5
    packed, state = ops.nf4_quantize(w, blocksize, True)
    w32 = ops.nf4_dequantize(packed, state, torch.float32)
    dtype = _linear_dtypes(backend)[1]
    x = torch.randn(9, 2048, device=backend.device, dtype=dtype)
    y = ops.nf4_linear(x, packed, state)
    base = torch.nn.functional.linear(x, w32.to(dtype))
    assert_kernel_close(y, x.double() @ w32.double().T, base, name=f"nf4_linear blocksize {blocksize}")


@pytest.mark.parametrize("rows", (0, 1, 7, 16, 17, 33))
@pytest.mark.parametrize("blocksize, in_features", [(32, 96), (64, 192), (128, 640), (4096, 4096)], ids=str)
@pytest.mark.parametrize("double_quant", (False, True))
def test_nf4_linear_row_counts(backend, rows, blocksize, in_features, double_quant):
    """Half-precision x with K a multiple of the blocksize (the CPU's bf16 kernel): every row count
    up to and past its 16-row groups, K not a multiple of 128, 100 outputs (a partial tile of 16;
    nested blocks of 256 absmax that start inside weight rows)."""
    w = torch.randn(100, in_features, device=backend.device) / in_features ** 0.5
    packed, state = ops.nf4_quantize(w, blocksize, double_quant)
    w32 = ops.nf4_dequantize(packed, state, torch.float32)
    dtype = _linear_dtypes(backend)[1]
    x = torch.randn(rows, in_features, device=backend.device, dtype=dtype)
    y = ops.nf4_linear(x, packed, state)
    assert y.shape == (rows, 100) and y.dtype == dtype
    base = torch.nn.functional.linear(x, w32.to(dtype))
    assert_kernel_close(y, x.double() @ w32.double().T, base, name=f"nf4_linear {rows} rows")


def test_nf4_linear_empty_batch(backend):
    packed, state = ops.nf4_quantize(torch.randn(8, 64, device=backend.device), 64)
    x = torch.zeros(0, 64, device=backend.device, requires_grad=True)
    y = ops.nf4_linear(x, packed, state)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 64)


# ---- LinearNF4 against bitsandbytes.nn.Linear4bit -----------------------------------------------------


def _bnb_linear(linear, compute_dtype, double_quant):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("precision", ("float32", "half"))
@pytest.mark.parametrize("double_quant", (False, True))
def test_linear_nf4_matches_bnb_linear4bit(backend, precision, double_quant):
    """Forward and input gradient against bitsandbytes' CPU Linear4bit (bf16, or fp16 in the interpreter)."""
    dtype = torch.float32 if precision == "float32" else _linear_dtypes(backend)[1]
    linear = torch.nn.Linear(128, 40)  # rows hold whole blocks (see test_rows_straddling_blocks_decode_by_the_format)
    ours = llmkern.nn.LinearNF4.from_linear(linear, double_quant=double_quant, compute_dtype=dtype)
    theirs = _bnb_linear(linear, dtype, double_quant)
    assert torch.equal(ours.weight.data, theirs.weight.data)
    with torch._dynamo.config.patch(disable=True):
        w32 = bnbF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state, quant_type="nf4").float()
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 5, 40, dtype=dtype)
    y = ours.to(backend.device)(x.to(backend.device)).cpu()
    (dx,) = torch.autograd.grad(y, x, dy)
    xb = x.detach().clone().requires_grad_(True)
    with torch._dynamo.config.patch(disable=True):
        yb = theirs(xb)
        (dxb,) = torch.autograd.grad(yb, xb, dy)
    ref = x.detach().double() @ w32.double().T + linear.bias.detach().double()
    assert_kernel_close(y, ref, yb, name="LinearNF4 forward vs Linear4bit")
    assert_kernel_close(dx, dy.double() @ w32.double(), dxb, name="LinearNF4 dx vs Linear4bit")
    assert ours.weight.grad is None and not ours.weight.requires_grad


@pytest.mark.parametrize("double_quant", (False, True))
def test_linear_nf4_state_dict_loads_both_ways(double_quant):
    linear = torch.nn.Linear(64, 24)
    theirs = _bnb_linear(linear, torch.float32, double_quant)
    sd = theirs.state_dict()
    expected = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected
    ours = llmkern.nn.LinearNF4(64, 24)
    ours.load_state_dict(sd)  # bitsandbytes -> llmkern
    assert ours.quant_state.nested == double_quant
    mine = llmkern.nn.LinearNF4.from_linear(linear, double_quant=double_quant).state_dict()
    assert set(mine) == expected
    for key in expected:
        assert torch.equal(mine[key], sd[key]), key
    # llmkern -> bitsandbytes, the way transformers loads a prequantized checkpoint.
    stats = {k[len("weight."):]: v for k, v in mine.items() if k.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(data=mine["weight"], quantized_stats=stats, requires_grad=False,
                                                 device="cpu")
    x = torch.randn(4, 64)
    with torch._dynamo.config.patch(disable=True):
        w_bnb = bnbF.dequantize_4bit(weight.data, weight.quant_state, quant_type="nf4")
    assert torch.equal(w_bnb, ours.dequantize(torch.float32))
    torch.testing.assert_close(ours(x), torch.nn.functional.linear(x, w_bnb, linear.bias.detach()))


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"][:3]}), "absmax must be"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__fp4": sd.pop("weight.quant_state.bitsandbytes__nf4")}),
     "unknown quant type"),
    (lambda sd: sd.update({"weight": sd["weight"][:-2]}), "packed weight must be uint8 with"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("weight.")], "quant state .* is missing"),
])
def test_linear_nf4_rejects_corrupt_state_dict(corrupt, match):
    sd = llmkern.nn.LinearNF4(64, 24).state_dict()
    corrupt(sd)
    with pytest.raises(ValueError, match=match):
        llmkern.nn.LinearNF4(64, 24).load_state_dict(sd)


def test_linear_nf4_rejects_other_shape():
    sd = llmkern.nn.LinearNF4(64, 24).state_dict()
    with pytest.raises(ValueError, match=r"weight of shape \(24, 64\), this layer is \(32, 48\)"):
        llmkern.nn.LinearNF4(48, 32).load_state_dict(sd)


def test_linear_nf4_module_behaviour():
    linear = torch.nn.Linear(70, 10, bias=False).to(torch.bfloat16)
    layer = llmkern.nn.LinearNF4.from_linear(linear, blocksize=32, double_quant=False)
    assert (layer.in_features, layer.out_features, layer.bias) == (70, 10, None)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (350, 1)
    assert layer.quant_state.shape == (10, 70) and layer.quant_state.dtype == torch.bfloat16
    assert "nf4 blocksize=32" in repr(layer) and "float32 absmax" in repr(layer)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    x = torch.randn(2, 70, dtype=torch.float32)
    assert layer(x).dtype == torch.float32  # computed in the input's dtype (compute_dtype=None)
    assert layer.half().quant_state.absmax.dtype == torch.float32  # dtype casts leave the quant state alone
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        llmkern.nn.LinearNF4.from_linear(torch.nn.Conv1d(2, 2, 1))


# ---- input checks, custom-op registration -------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(8, 64)
    packed, state = ops.nf4_quantize(x, 64)
    with pytest.raises(ValueError, match=r"nf4_quantize: blocksize must be one of .* got 48"):
        ops.nf4_quantize(x, 48)
    with pytest.raises(TypeError, match=r"nf4_quantize: x must have dtype in .* got int32"):
        ops.nf4_quantize(x.int(), 64)
    with pytest.raises(ValueError, match="nf4_quantize: x must have at least one element"):
        ops.nf4_quantize(torch.zeros(0), 64)
    with pytest.raises(TypeError, match="nf4_dequantize: packed must have dtype in"):
        ops.nf4_dequantize(packed.to(torch.int8), state)
    with pytest.raises(ValueError, match="nf4_dequantize: the packed weight must be uint8 with 256 bytes"):
        ops.nf4_dequantize(packed[:-1], state)
    with pytest.raises(TypeError, match="nf4_dequantize: dtype must be one of"):
        ops.nf4_dequantize(packed, state, torch.int8)
    with pytest.raises(TypeError, match="nf4_linear: state must be a llmkern.QuantState"):
        ops.nf4_linear(torch.randn(2, 64), packed, state.to_bnb())
    with pytest.raises(ValueError, match=r"nf4_linear: x must have last dim in_features=64, got shape \(2, 63\)"):
        ops.nf4_linear(torch.randn(2, 63), packed, state)
    with pytest.raises(ValueError, match=r"nf4_linear: bias must have shape \(8,\)"):
        ops.nf4_linear(torch.randn(2, 64), packed, state, torch.zeros(9))
    _, state3 = ops.nf4_quantize(torch.randn(2, 4, 8), 64)
    with pytest.raises(ValueError, match="nf4_linear: the weight must be 2-D"):
        ops.nf4_linear(torch.randn(2, 8), packed[:32], state3)


@pytest.mark.skipif(llmkern.backends.TRITON_INTERPRET, reason="compiling around the interpreter adds minutes")
def test_torch_compile_fullgraph():
    packed, state = ops.nf4_quantize(torch.randn(32, 64), 64, True)
    x = torch.randn(4, 64, requires_grad=True)
    y = torch.compile(lambda t: ops.nf4_linear(t, packed, state), fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, ops.nf4_linear(x, packed, state), rtol=0, atol=0)
    assert x.grad.shape == x.shape
    dequant = torch.compile(lambda p: ops.nf4_dequantize(p, state), fullgraph=True)
    assert torch.equal(dequant(packed), ops.nf4_dequantize(packed, state))


@pytest.mark.parametrize("double_quant", (False, True))
def test_custom_ops_pass_opcheck(backend, double_quant):
    w = torch.randn(16, 64, device=backend.device)
    packed, state = ops.nf4_quantize(w, 64, double_quant)
    flat = packed.view(-1)
    nested = (state.state2.absmax, state.state2.code, state.offset.reshape(())) if double_quant else (None, None, None)
    x = torch.randn(3, 64, device=backend.device, requires_grad=True)
    torch.library.opcheck(torch.ops.llmkern.nf4_quantize.default, (w.view(-1), 64))
    torch.library.opcheck(torch.ops.llmkern.nf4_dequantize.default,
                          (flat, state.absmax, *nested, w.numel(), 64, 256, torch.float16))
    torch.library.opcheck(torch.ops.llmkern.nf4_linear.default, (x, flat, state.absmax, *nested, 16, 64, 64, 256))
