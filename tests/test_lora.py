"""LoRA / QLoRA: ``llmkern.ops.lora_linear`` and ``llmkern.nn.LoRALinear`` on every backend.

Forward and dX / dA / dB are checked against the fp64 reference (:mod:`llmkern.reference.lora`) with
DESIGN's numerics rule (error at most 2x that of PyTorch's own same-dtype computation, i.e. PEFT's
formula run in the input's dtype), and against ``peft``'s LoRA layer on a real ``nn.Linear`` and on
a ``bitsandbytes`` ``Linear4bit``. Fallbacks are errors here (LLMKERN_STRICT=1), so a backend that
silently handed a case to the reference would fail.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.nn import LinearNF4, LoRALinear
from llmkern.ops import lora_linear, nf4_dequantize, nf4_quantize
from llmkern.reference import lora as ref
from tests._numerics import assert_close, assert_kernel_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims, in_features, out_features, rank, bias, dropout_p): ranks 1 / 8 / 64, 1-3 leading
# dims, odd feature sizes both ways round, bias and dropout on and off.
CASES = [
    ((7,), 37, 100, 1, True, 0.0),
    ((2, 3), 37, 100, 8, False, 0.25),
    ((2, 1, 3), 37, 100, 64, True, 0.5),
    ((5,), 100, 37, 8, True, 0.0),
]
CASE_IDS = ["r1-bias", "r8-2d-dropout", "r64-3d-bias-dropout", "100x37-r8"]

# NF4 weights: (in_features, out_features, blocksize, double_quant). Rows of 64/128/256 are whole blocks
# (the structured-load kernel path, with tiles spanning several blocks or a part of one); 37 is not
# (one gather per element).
NF4_CASES = [(64, 48, 32, False), (128, 40, 64, True), (256, 24, 256, False), (37, 100, 64, True)]


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("LLMKERN_STRICT", "1")


def _skip_unsupported(backend, dtype):
    if dtype == torch.bfloat16 and backend.interpreted:
        pytest.skip("Triton's interpreter computes bfloat16 incorrectly; bf16 runs on GPUs and the other backends")


def _torch_lora(x, w, a, b, scaling, bias, p, seed):
    """PEFT's formula in x's dtype (the numerics baseline), with the reference dropout mask."""
    xd = x
    if p > 0:
        keep = ref.dropout_keep((x.reshape(-1, x.shape[-1]).shape), p, seed, x.device).view(x.shape)
        xd = x * keep.to(x.dtype) / (1 - p)
    return F.linear(x, w, bias) + F.linear(F.linear(xd, a), b) * scaling


def _run(fn, x, a, b, dy, x_grad=True):
    """(out, dx, dA, dB) of ``fn(x, a, b)`` with ``dy`` as the output gradient."""
    x = x.detach().clone().requires_grad_(x_grad)
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    out = fn(x, a, b)
    out.backward(dy)
    return out.detach(), (x.grad if x_grad else None), a.grad, b.grad


def _check_all(actual, reference, baseline, name):
    for what, act, want, base in zip(("out", "dx", "dA", "dB"), actual, reference, baseline):
        if act is not None:
            assert_kernel_close(act, want, base, name=f"{name} {what}")


def _make(lead, k, n, r, has_bias, dtype, device):
    x = torch.randn(*lead, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    a = (torch.randn(r, k, device=device) / math.sqrt(k)).to(dtype)
    b = (torch.randn(n, r, device=device) / math.sqrt(r)).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if has_bias else None
    dy = torch.randn(*lead, n, device=device).to(dtype)
    return x, w, a, b, bias, dy


def _compare(backend, x, w_op, w_dense, a, b, bias, dy, scaling, p, seed, name, x_grad=True):
    """Run lora_linear on ``backend`` and check it against the fp64 reference and the same-dtype baseline."""
    with llmkern.use_backend(backend.name):
        got = _run(lambda x_, a_, b_: lora_linear(x_, w_op, a_, b_, scaling, bias, p, seed=seed), x, a, b, dy, x_grad)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want = _run(lambda x_, a_, b_: ref.lora_linear(x_, w_dense.double(), a_, b_, scaling, d(bias), p, seed),
                x.double(), a.double(), b.double(), dy.double(), x_grad)
    base = _run(lambda x_, a_, b_: _torch_lora(x_, w_dense.to(x.dtype), a_, b_, scaling, bias, p, seed),
                x, a, b, dy, x_grad)
    _check_all(got, want, base, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dense_forward_backward(backend, case, dtype):
    _skip_unsupported(backend, dtype)
    lead, k, n, r, has_bias, p = case
    x, w, a, b, bias, dy = _make(lead, k, n, r, has_bias, dtype, backend.device)
    _compare(backend, x, w, w, a, b, bias, dy, 16 / r, p, 1234, f"{backend.name} {case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("nf4_case", NF4_CASES, ids=["64x48-bs32", "128x40-bs64-dq", "256x24-bs256", "37x100-bs64-dq"])
def test_nf4_forward_backward(backend, nf4_case, dtype):
    k, n, blocksize, double_quant = nf4_case
    p = 0.3 if double_quant else 0.0
    x, w, a, b, bias, dy = _make((3, 5), k, n, 8, True, dtype, backend.device)
    packed, state = nf4_quantize(w.float(), blocksize, double_quant)
    w_dense = nf4_dequantize(packed, state, torch.float32)
    _compare(backend, x, (packed, state), w_dense, a, b, bias, dy, 2.0, p, 77, f"{backend.name} nf4 {nf4_case} {dtype}")


@pytest.mark.parametrize("nf4_case", NF4_CASES, ids=["64x48-bs32", "128x40-bs64-dq", "256x24-bs256", "37x100-bs64-dq"])
def test_cpu_nf4_chunks(backend, nf4_case, monkeypatch):
    """The cpu backend's NF4 path with tiny dequantization chunks: many row chunks and column blocks."""
    if backend.name != "cpu":
        pytest.skip("the chunked NF4 GEMMs are the cpu backend's")
    from llmkern.backends.cpu import lora as cpu_lora

    monkeypatch.setattr(cpu_lora, "CHUNK_ELEMENTS", 256)
    k, n, blocksize, double_quant = nf4_case
    x, w, a, b, bias, dy = _make((7,), k, n, 4, True, torch.float32, backend.device)
    packed, state = nf4_quantize(w, blocksize, double_quant)
    assert len(cpu_lora._row_chunks(n, k, blocksize)) > 1
    _compare(backend, x, (packed, state), nf4_dequantize(packed, state, torch.float32), a, b, bias, dy, 2.0, 0.0, 0,
             f"cpu chunks {nf4_case}")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_input_without_grad(backend, nf4):
    """x that needs no gradient (e.g. a first layer): dA and dB only."""
    x, w, a, b, bias, dy = _make((9,), 64, 40, 4, False, torch.float32, backend.device)
    w_op = nf4_quantize(w, 64, True) if nf4 else w
    w_dense = nf4_dequantize(*w_op, torch.float32) if nf4 else w
    _compare(backend, x, w_op, w_dense, a, b, bias, dy, 0.5, 0.2, 5, f"{backend.name} no-dx", x_grad=False)


def test_bias_gradient(backend):
    """A bias that requires grad gets ``dy.sum(0)``; W still gets none (it must be frozen)."""
    x, w, a, b, bias, dy = _make((6,), 37, 20, 4, True, torch.float32, backend.device)
    bias.requires_grad_()
    with llmkern.use_backend(backend.name):
        lora_linear(x, w, a, b, 1.0, bias).backward(dy)
    assert_close(bias.grad, dy.sum(0), atol=1e-5, rtol=1e-6, name="dbias")


def test_empty_batch(backend):
    x = torch.randn(0, 37, device=backend.device, requires_grad=True)
    w = torch.randn(20, 37, device=backend.device)
    a = torch.randn(4, 37, device=backend.device, requires_grad=True)
    b = torch.randn(20, 4, device=backend.device, requires_grad=True)
    with llmkern.use_backend(backend.name):
        y = lora_linear(x, w, a, b, 2.0)
        y.sum().backward()
    assert y.shape == (0, 20)
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


# ---- dropout mask -----------------------------------------------------------------------------------------------

def test_dropout_mask_is_a_function_of_the_seed(backend):
    """Same seed: same output (the backward regenerates the forward's mask); another seed: another output."""
    x, w, a, b, _, _ = _make((16,), 64, 16, 4, False, torch.float32, backend.device)
    b = torch.randn_like(b)
    with llmkern.use_backend(backend.name):
        y1 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=11)
        y2 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=11)
        y3 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=12)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)


def test_reference_mask_statistics():
    """The kept fraction is 1 - p (within 4 sigma) and masks of nearby seeds are unrelated."""
    keep = ref.dropout_keep((128, 256), 0.3, 99)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    other = ref.dropout_keep((128, 256), 0.3, 100)
    assert abs((keep == other).float().mean().item() - (0.7**2 + 0.3**2)) < 0.01


def test_cpu_dropout_mask_matches_reference(backend):
    """The C++ Philox mask is bit-identical to the reference's (which reproduces Triton's tl.rand)."""
    if backend.name != "cpu":
        pytest.skip("the C++ mask is the cpu backend's")
    from llmkern.backends.cpu.lora import _ext

    x = torch.randn(33, 257) + 3.0  # no zeros, so every zero of the result is a dropped element
    for seed, p in ((0, 0.1), (2**31 - 2, 0.5), (123456789, 0.9)):
        got = _ext.dropout_keep(x, seed, p)
        assert torch.equal(got != 0, ref.dropout_keep((33, 257), p, seed)), f"seed {seed} p {p}"
        assert torch.equal(got[got != 0], x[got != 0])


def test_triton_rand_matches_reference(backend):
    """``reference.philox_uniform`` equals ``tl.rand`` bit for bit, including offsets past 2**32."""
    if backend.name != "triton":
        pytest.skip("needs the Triton backend")
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed, start, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.rand(seed, start + offs.to(tl.int64)), mask=offs < n)

    start, n = 2**32 - 300, 1000
    out = torch.empty(n, device=backend.device)
    for seed in (0, 987654321):
        rand_kernel[(1,)](out, seed, start, n, BLOCK=1024)
        want = ref.philox_uniform(seed, torch.arange(start, start + n, dtype=torch.int64))
        assert torch.equal(out.cpu(), want)


# ---- LoRALinear and PEFT ----------------------------------------------------------------------------------------

def _peft_wrap(base, r, alpha, p=0.0):
    peft = pytest.importorskip("peft")
    # autocast_adapter_dtype=False: PEFT would otherwise keep fp16/bf16 adapters in fp32.
    model = peft.get_peft_model(torch.nn.Sequential(base), peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p,
                                                                            target_modules=["0"]),
                                autocast_adapter_dtype=False)
    return model, model.base_model.model[0]


def _to_peft_keys(sd):
    """Our LoRALinear keys -> PEFT's in-memory keys for a layer at ``base_model.model.0``."""
    return {"base_model.model.0." + k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v
            for k, v in sd.items()}


class _ReferenceDropout(torch.nn.Module):
    """PEFT's dropout module replaced by the reference mask of ``seed`` (so PEFT and llmkern draw the same)."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        keep = ref.dropout_keep((x.reshape(-1, x.shape[-1]).shape), self.p, self.seed, x.device).view(x.shape)
        return x * keep.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_matches_peft_linear(backend, dtype):
    """LoRALinear over nn.Linear against PEFT's lora.Linear: same init (same seed), forward and gradients."""
    base = torch.nn.Linear(37, 100).to(dtype)
    torch.manual_seed(3)
    model, peft_layer = _peft_wrap(copy.deepcopy(base), 8, 16)
    torch.manual_seed(3)
    ours = LoRALinear(copy.deepcopy(base), r=8, lora_alpha=16).to(backend.device)
    assert torch.equal(ours.lora_A.weight.cpu(), peft_layer.lora_A["default"].weight)  # PEFT's init, bit for bit
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(2, 3, 37).to(dtype)
    dy = torch.randn(2, 3, 100).to(dtype)

    def grads(layer, xx, dyy):
        xx = xx.clone().requires_grad_()
        y = layer(xx)
        y.backward(dyy)
        a, b = (layer.lora_A, layer.lora_B) if isinstance(layer, LoRALinear) else \
            (layer.lora_A["default"], layer.lora_B["default"])
        return y.detach(), xx.grad, a.weight.grad, b.weight.grad

    with llmkern.use_backend(backend.name):
        got = grads(ours, x.to(backend.device), dy.to(backend.device))
    want = grads(copy.deepcopy(peft_layer).double(), x.double(), dy.double())
    base_ = grads(peft_layer, x, dy)
    _check_all([t.cpu() for t in got], want, base_, f"peft {dtype}")


def test_functional_matches_peft_with_dropout(backend):
    """With dropout, given the same mask, lora_linear is PEFT's forward and backward."""
    base = torch.nn.Linear(37, 100)
    model, peft_layer = _peft_wrap(copy.deepcopy(base), 8, 16, p=0.4)
    peft_layer.lora_dropout["default"] = _ReferenceDropout(0.4, 2024)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    x, dy = torch.randn(4, 37), torch.randn(4, 100)
    dev = backend.device

    def ours(x_, a_, b_):
        return lora_linear(x_, base.weight.detach().to(dev), a_, b_, 2.0, base.bias.detach().to(dev), 0.4, seed=2024)

    with llmkern.use_backend(backend.name):
        got = _run(ours, x.to(dev), pa.to(dev), pb.to(dev), dy.to(dev))
    xx = x.clone().requires_grad_()
    y = model(xx)
    y.backward(dy)
    for name, g, w in zip(("out", "dx", "dA", "dB"), got, (y, xx.grad, pa.grad, pb.grad)):
        assert_close(g.cpu(), w, atol=2e-5, rtol=1e-5, name=name)


def _bnb_linear4bit(linear, compute_dtype):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_matches_peft_on_bnb_linear4bit(backend, dtype):
    """QLoRA: LoRALinear over LinearNF4 loaded from a bnb Linear4bit state_dict, against PEFT on that Linear4bit."""
    _skip_unsupported(backend, dtype)
    linear = torch.nn.Linear(64, 48)
    model, peft_layer = _peft_wrap(_bnb_linear4bit(linear, dtype), 8, 16)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
    nf4 = LinearNF4(64, 48, compute_dtype=dtype)
    nf4.load_state_dict(peft_layer.base_layer.state_dict())
    ours = LoRALinear(nf4, r=8, lora_alpha=16)
    ours.lora_A.weight.data.copy_(peft_layer.lora_A["default"].weight)
    ours.lora_B.weight.data.copy_(peft_layer.lora_B["default"].weight)
    ours.to(backend.device)
    x, dy = torch.randn(3, 5, 64), torch.randn(3, 5, 48)

    xx = x.clone().requires_grad_()
    y = model(xx)
    y.backward(dy)
    want = (y.detach(), xx.grad, peft_layer.lora_A["default"].weight.grad, peft_layer.lora_B["default"].weight.grad)
    xo = x.to(backend.device).requires_grad_()
    with llmkern.use_backend(backend.name):
        yo = ours(xo)
        yo.backward(dy.to(backend.device))
    got = (yo.detach(), xo.grad, ours.lora_A.weight.grad, ours.lora_B.weight.grad)
    # PEFT + bnb compute in the compute dtype too: compare within that dtype's rounding of the results.
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for name, g, w in zip(("out", "dx", "dA", "dB"), got, want):
        scale = w.float().abs().max().item()
        assert_close(g.float().cpu(), w.float(), atol=tol * max(scale, 1.0), name=f"bnb {dtype} {name}")


def _load_into_peft(model, peft_layer, sd, nf4):
    """Load our LoRALinear state_dict into a PEFT model: strict for an nn.Linear base; for a bnb Linear4bit
    base as transformers does it (bnb's load_state_dict ignores quant-state keys): the 4-bit weight via
    ``Params4bit.from_prequantized``, the adapter via PEFT's ``set_peft_model_state_dict``."""
    peft = pytest.importorskip("peft")
    if not nf4:
        model.load_state_dict(_to_peft_keys(sd), strict=True)
        return
    bnb = pytest.importorskip("bitsandbytes")
    stem = "base_layer.weight."
    stats = {k[len(stem):]: v for k, v in sd.items() if k.startswith(stem)}
    peft_layer.base_layer.weight = bnb.nn.Params4bit.from_prequantized(sd["base_layer.weight"], stats, device="cpu")
    peft_layer.base_layer.bias.data.copy_(sd["base_layer.bias"])
    adapter = {f"base_model.model.0.{k}": v for k, v in sd.items() if k.startswith("lora_")}
    result = peft.set_peft_model_state_dict(model, adapter)
    assert not result.unexpected_keys, result.unexpected_keys


@pytest.mark.parametrize("nf4", [False, True], ids=["linear", "nf4"])
def test_state_dict_loads_into_peft_and_back(nf4):
    """state_dict keys: ours -> a PEFT-wrapped model -> ours again (strict), outputs unchanged."""
    linear = torch.nn.Linear(64, 48)
    ours = LoRALinear(LinearNF4.from_linear(linear) if nf4 else copy.deepcopy(linear), r=4, lora_alpha=8)
    torch.nn.init.normal_(ours.lora_B.weight)
    peft_base = _bnb_linear4bit(torch.nn.Linear(64, 48), torch.float32) if nf4 else torch.nn.Linear(64, 48)
    model, peft_layer = _peft_wrap(peft_base, 4, 8)
    _load_into_peft(model, peft_layer, ours.state_dict(), nf4)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert_close(model(x), ours(x), atol=2e-5, rtol=1e-5, name="peft after load")
    peft = pytest.importorskip("peft")
    adapter = peft.get_peft_model_state_dict(model)  # PEFT's saved-adapter format: our key names
    assert set(adapter) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}
    back = LoRALinear(LinearNF4.from_linear(torch.nn.Linear(64, 48)) if nf4 else torch.nn.Linear(64, 48), r=4,
                      lora_alpha=8)
    sd = {k.replace("base_model.model.0.", "").replace(".default", ""): v for k, v in model.state_dict().items()}
    back.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))
    assert set(ours.state_dict()) >= {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}


# ---- module behaviour -------------------------------------------------------------------------------------------

def test_init_freezes_base_and_starts_as_identity_update(backend):
    base = torch.nn.Linear(37, 100).to(backend.device)
    layer = LoRALinear(base, r=8, lora_alpha=16, lora_dropout=0.1)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.scaling == 2.0
    bound = 1 / math.sqrt(37)  # kaiming_uniform_(a=sqrt(5))
    assert layer.lora_A.weight.abs().max().item() <= bound
    assert layer.lora_A.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(4, 37, device=backend.device)
    with llmkern.use_backend(backend.name):
        assert_close(layer.eval()(x), base(x), atol=1e-5, rtol=1e-5, name="identity update")


def test_dropout_only_in_training(backend):
    base = torch.nn.Linear(37, 20).to(backend.device)
    layer = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 37, device=backend.device)
    with llmkern.use_backend(backend.name), torch.no_grad():
        torch.manual_seed(1)
        t1 = layer.train()(x)
        torch.manual_seed(1)
        t2 = layer(x)
        e = layer.eval()(x)
        plain = lora_linear(x, base.weight, layer.lora_A.weight, layer.lora_B.weight, 2.0, base.bias)
    assert torch.equal(t1, t2)  # torch.manual_seed makes the mask repeatable
    assert not torch.allclose(t1, e)
    assert torch.equal(e, plain)


@pytest.mark.parametrize("nf4", [False, True], ids=["linear", "nf4"])
def test_merge_unmerge(backend, nf4):
    linear = torch.nn.Linear(64, 48)
    base = LinearNF4.from_linear(linear, compute_dtype=torch.float32) if nf4 else linear
    layer = LoRALinear(base, r=8, lora_alpha=16).to(backend.device)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 64, device=backend.device)
    with llmkern.use_backend(backend.name), torch.no_grad():
        adapter = layer(x)
        before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
        dense_w = base.dequantize(torch.float32) if nf4 else base.weight.clone()
        layer.merge()
        assert layer.merged
        merged_base = layer.base_layer
        assert type(merged_base) is torch.nn.Linear and merged_base.weight.dtype == torch.float32
        # dequant(W) + scaling * B @ A: no re-quantization
        assert_close(merged_base.weight, dense_w + 2.0 * layer.lora_B.weight @ layer.lora_A.weight, atol=1e-6,
                     name="merged W")
        assert_close(layer(x), adapter, atol=1e-5, rtol=1e-5, name="merged output")
        layer.unmerge()
        assert not layer.merged and layer.base_layer is base
        after = layer.base_layer.state_dict()
        for k, v in before.items():
            if nf4:
                assert torch.equal(after[k], v), k  # the original 4-bit weight, bit for bit
            else:
                assert_close(after[k], v, atol=1e-6, name=k)
        assert_close(layer(x), adapter, atol=1e-5, rtol=1e-5, name="unmerged output")


def test_fp32_adapter_on_half_base(backend):
    """Adapters kept in fp32 (PEFT's autocast_adapter_dtype) on a half base: cast per call, grads in fp32."""
    base = torch.nn.Linear(37, 20).to(backend.device, torch.float16)
    layer = LoRALinear(base, r=4, lora_alpha=8)
    layer.lora_A.float()
    layer.lora_B.float()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 37, device=backend.device, dtype=torch.float16)
    with llmkern.use_backend(backend.name):
        y = layer(x)
        y.float().sum().backward()
    assert y.dtype == torch.float16
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32


# ---- bad input --------------------------------------------------------------------------------------------------

def test_bad_input():
    x = torch.randn(4, 37)
    w = torch.randn(100, 37)
    a = torch.randn(8, 37)
    b = torch.randn(100, 8)
    with pytest.raises(ValueError, match=r"lora_linear: rank mismatch: lora_A \(r, in\) has rank 8 but lora_B .* \(100, 4\)"):
        lora_linear(x, w, a, torch.randn(100, 4), 2.0)
    with pytest.raises(ValueError, match=r"lora_linear: in_features mismatch: x has 37 .* lora_A .* \(8, 36\)"):
        lora_linear(x, w, torch.randn(8, 36), b, 2.0)
    with pytest.raises(ValueError, match=r"lora_linear: in_features mismatch: x has 37 .* weight .* \(100, 40\)"):
        lora_linear(x, torch.randn(100, 40), a, b, 2.0)
    with pytest.raises(ValueError, match=r"lora_linear: out_features mismatch"):
        lora_linear(x, torch.randn(99, 37), a, b, 2.0)
    with pytest.raises(TypeError, match=r"lora_linear: lora_A must have dtype in \(float32\), got float16"):
        lora_linear(x, w, a.half(), b, 2.0)
    with pytest.raises(TypeError, match=r"lora_linear: weight must have dtype in \(float32\), got bfloat16"):
        lora_linear(x, w.bfloat16(), a, b, 2.0)
    with pytest.raises(TypeError, match=r"lora_linear: x must have dtype in .* got int64"):
        lora_linear(x.long(), w, a, b, 2.0)
    with pytest.raises(ValueError, match=r"lora_linear: bias must have shape \(100,\), got \(37,\)"):
        lora_linear(x, w, a, b, 2.0, torch.randn(37))
    with pytest.raises(ValueError, match=r"lora_linear: dropout_p must be in \[0, 1\), got 1.0"):
        lora_linear(x, w, a, b, 2.0, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"lora_linear: seed must be an int in"):
        lora_linear(x, w, a, b, 2.0, dropout_p=0.1, seed=-1)
    with pytest.raises(TypeError, match=r"lora_linear: scaling must be a finite real number"):
        lora_linear(x, w, a, b, float("nan"))
    with pytest.raises(ValueError, match=r"lora_linear: weight must be frozen"):
        lora_linear(x, w.requires_grad_(), a, b, 2.0)


def test_bad_nf4_weight():
    x = torch.randn(4, 64)
    a, b = torch.randn(8, 64), torch.randn(48, 8)
    packed, state = nf4_quantize(torch.randn(48, 64))
    with pytest.raises(ValueError, match=r"lora_linear: the NF4 weight must have shape .* \(48, 64\) .* got \(64, 48\)"):
        lora_linear(x, nf4_quantize(torch.randn(64, 48)), a, b, 2.0)
    with pytest.raises(TypeError, match=r"lora_linear: an NF4 weight must be a pair \(packed, llmkern.QuantState\)"):
        lora_linear(x, (packed, state.absmax), a, b, 2.0)
    with pytest.raises(ValueError, match=r"lora_linear: the packed weight must be uint8 with 1536 bytes"):
        lora_linear(x, (packed[:100], state), a, b, 2.0)
    with pytest.raises(TypeError, match=r"lora_linear: weight must be a dense tensor or a pair"):
        lora_linear(x, "W", a, b, 2.0)


def test_bad_module_arguments():
    with pytest.raises(TypeError, match=r"LoRALinear: base must be a torch.nn.Linear or llmkern.nn.LinearNF4, got Conv1d"):
        LoRALinear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"LoRALinear: r must be an int >= 1, got 0"):
        LoRALinear(torch.nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match=r"LoRALinear: lora_dropout must be in \[0, 1\), got 1.5"):
        LoRALinear(torch.nn.Linear(4, 4), lora_dropout=1.5)


def test_opcheck(backend):
    """torch.library.opcheck on both custom ops (schema, fake tensors, autograd registration)."""
    x, w, a, b, bias, dy = _make((5,), 37, 20, 4, True, torch.float32, backend.device)
    with llmkern.use_backend(backend.name):
        fwd_args = (x, w, None, None, 0, a.requires_grad_(), b.requires_grad_(), bias, 2.0, 0.25, 3)
        torch.library.opcheck(torch.ops.llmkern.lora_fwd.default, fwd_args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        xa = ref.lora_fwd(x, w, None, None, 0, a, b, bias, 2.0, 0.25, 3)[1]
        torch.library.opcheck(torch.ops.llmkern.lora_bwd.default,
                              (dy, x, w, None, None, 0, a, b, xa, 2.0, 0.25, 3, True),
                              test_utils=("test_schema", "test_faketensor"))
