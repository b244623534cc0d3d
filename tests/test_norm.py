"""LayerNorm / RMSNorm and the fused residual-add variants, on every backend.

Each kernel result is compared with ``torch.nn.functional`` evaluated in float64 on the same input
values, under DESIGN.md's rule: its error may be at most twice the error of PyTorch's own
computation in the input's dtype, plus a small atol (tests/_numerics.py). Forward outputs and every
gradient (x, residual, weight, bias) are checked.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern import backends, ops
from _numerics import assert_close, assert_kernel_close

# (hidden size, leading shape): the odd hidden sizes with one to three leading dims, and a row
# wide enough for the chunked Triton kernels (backward above 4096, forward above 8192).
SHAPES = [(1, (5,)), (7, (2, 3)), (123, (3, 1, 2)), (1000, (4,)), (4097, (2, 3)), (12289, (3,))]
# (kind, parameters present): LayerNorm with and without weight/bias, RMSNorm with and without weight.
VARIANTS = [("layer", "wb"), ("layer", "w"), ("layer", "b"), ("layer", ""), ("rms", "w"), ("rms", "")]


def _params(kind, affine, n, dtype, device):
    w = torch.randn(n, dtype=dtype, device=device) * 0.5 + 1 if "w" in affine else None
    b = torch.randn(n, dtype=dtype, device=device) * 0.5 if "b" in affine and kind == "layer" else None
    return w, b


def _norm(lib, kind, x, w, b, eps):
    """``lib`` is ``F`` or ``llmkern.ops``: the same call either way."""
    if kind == "layer":
        return lib.layer_norm(x, (x.shape[-1],), w, b, eps)
    return lib.rms_norm(x, (x.shape[-1],), w, eps)


def _add_norm(lib, kind, x, residual, w, b, eps):
    """``new_residual = x + residual``; ``out = norm(new_residual)``; with F as the unfused composition."""
    if lib is ops:
        if kind == "layer":
            return ops.add_layer_norm(x, residual, w, b, eps)
        return ops.add_rms_norm(x, residual, w, eps)
    h = (x + residual).to(residual.dtype)
    return _norm(F, kind, h.to(x.dtype), w, b, eps), h


def _grads(fn, inputs, cotangents):
    """Outputs of ``fn(*inputs)`` and the gradients of sum(out * cotangent) w.r.t. the non-None inputs."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, cotangents[:len(outs)])
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def _as(dtype, tensors):
    return [None if t is None else t.detach().to(dtype) for t in tensors]


def _check_all(name, got, ref, base):
    for i, (g, r, b) in enumerate(zip(got, ref, base, strict=True)):
        if r is None:
            assert g is None, f"{name}[{i}]: expected no gradient"
            continue
        assert g.dtype == b.dtype, f"{name}[{i}]: dtype {g.dtype}, torch gives {b.dtype}"
        assert_kernel_close(g, r, b, name=f"{name}[{i}]")


@pytest.mark.parametrize("kind,affine", VARIANTS, ids=[f"{k}-{a or 'none'}" for k, a in VARIANTS])
@pytest.mark.parametrize("hidden,lead", SHAPES, ids=[f"{h}x{len(lead)}d" for h, lead in SHAPES])
def test_norm_fp32_matches_torch(backend, kind, affine, hidden, lead):
    dev = backend.device
    x = torch.randn(*lead, hidden, device=dev) * 2 + 0.5
    w, b = _params(kind, affine, hidden, torch.float32, dev)
    dy = torch.randn_like(x)
    eps = 1e-5
    inputs = [x, w, b]
    out, grads = _grads(lambda *t: _norm(ops, kind, *t, eps), inputs, [dy])
    ref_out, ref_grads = _grads(lambda *t: _norm(F, kind, *t, eps), _as(torch.float64, inputs), [dy.double()])
    base_out, base_grads = _grads(lambda *t: _norm(F, kind, *t, eps), inputs, [dy])
    _check_all("out", out, ref_out, base_out)
    _check_all("grad", grads, ref_grads, base_grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("hidden,lead", [SHAPES[2], SHAPES[4]], ids=["123", "4097"])
def test_norm_half_precision_matches_torch(backend, dtype, kind, hidden, lead):
    dev = backend.device
    x = (torch.randn(*lead, hidden, device=dev) * 2 + 0.5).to(dtype)
    w, b = _params(kind, "wb", hidden, dtype, dev)
    dy = torch.randn_like(x)
    eps = 1e-5
    inputs = [x, w, b]
    out, grads = _grads(lambda *t: _norm(ops, kind, *t, eps), inputs, [dy])
    ref_out, ref_grads = _grads(lambda *t: _norm(F, kind, *t, eps), _as(torch.float64, inputs), [dy.double()])
    base_out, base_grads = _grads(lambda *t: _norm(F, kind, *t, eps), inputs, [dy])
    _check_all("out", out, ref_out, base_out)
    _check_all("grad", grads, ref_grads, base_grads)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)], ids=["fp32", "bf16", "fp16+fp32res"])
@pytest.mark.parametrize("hidden,lead", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=["7", "1000", "12289"])
def test_add_norm_matches_torch(backend, kind, x_dtype, res_dtype, hidden, lead):
    dev = backend.device
    x = torch.randn(*lead, hidden, device=dev).to(x_dtype)
    residual = (torch.randn(*lead, hidden, device=dev) * 3).to(res_dtype)
    w, b = _params(kind, "wb", hidden, x_dtype, dev)
    d_out, d_res = torch.randn_like(x), torch.randn_like(residual)
    eps = 1e-6
    inputs = [x, residual, w, b]
    out, grads = _grads(lambda *t: _add_norm(ops, kind, *t, eps), inputs, [d_out, d_res])
    ref_out, ref_grads = _grads(lambda *t: _add_norm(F, kind, *t, eps), _as(torch.float64, inputs),
                                [d_out.double(), d_res.double()])
    base_out, base_grads = _grads(lambda *t: _add_norm(F, kind, *t, eps), inputs, [d_out, d_res])
    _check_all("out", out, ref_out, base_out)
    _check_all("grad", grads, ref_grads, base_grads)


def _strided(layout, n, dev):
    """A leaf tensor and a (2-3)-D view of it whose rows are not plain contiguous rows of n."""
    if layout == "transposed":  # leading dims swapped: rows cannot be viewed as (M, n)
        base = torch.randn(4, 3, n, device=dev)
        return base, lambda t: t.transpose(0, 1)
    if layout == "row-stride":  # a column slice: row stride n + 9, storage offset 4
        base = torch.randn(2, 3, n + 9, device=dev)
        return base, lambda t: t[..., 4:4 + n]
    base = torch.randn(n, 6, device=dev)  # last dim strided: needs the one copy
    return base, lambda t: t.t()


@pytest.mark.parametrize("kind", ["layer", "rms", "add_layer", "add_rms"])
@pytest.mark.parametrize("layout", ["transposed", "row-stride", "lastdim-strided"])
def test_strided_views(backend, kind, layout):
    """Non-contiguous x/residual/weight and a stride-0 (expanded) output gradient."""
    n, dev = 123, backend.device
    base, view = _strided(layout, n, dev)
    res_base, _ = _strided(layout, n, dev)
    w_base = torch.randn(2 * n, device=dev)
    b = torch.randn(n, device=dev)
    add, norm_kind = kind.startswith("add_"), kind.removeprefix("add_")
    bias = b if norm_kind == "layer" else None
    eps = 1e-5

    def run(lib, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (base, res_base, w_base)]
        x, residual, w = view(leaves[0]), view(leaves[1]), leaves[2][::2]
        bb = None if bias is None else bias.to(dtype)
        if add:
            out, h = _add_norm(lib, norm_kind, x, residual, w, bb, eps)
            (h * 0.5).sum().backward(retain_graph=True)
        else:
            out = _norm(lib, norm_kind, x, w, bb, eps)
        out.backward(torch.linspace(-1, 1, n, device=dev, dtype=dtype).expand_as(out))
        return [out.detach()] + [t.grad for t in (leaves if add else leaves[::2])]

    got, ref, baseline = run(ops, torch.float32), run(F, torch.float64), run(F, torch.float32)
    for i, (g, r, bl) in enumerate(zip(got, ref, baseline, strict=True)):
        assert_kernel_close(g, r, bl, name=f"{kind}/{layout}[{i}]")


def test_multi_dim_normalized_shape(backend):
    dev = backend.device
    x = torch.randn(4, 3, 5, device=dev)
    w, b = torch.randn(3, 5, device=dev), torch.randn(3, 5, device=dev)
    dy = torch.randn_like(x)
    out, grads = _grads(lambda *t: ops.layer_norm(t[0], (3, 5), t[1], t[2]), [x, w, b], [dy])
    torch_ln = lambda *t: F.layer_norm(t[0], (3, 5), t[1], t[2])  # noqa: E731
    ref_out, ref_grads = _grads(torch_ln, _as(torch.float64, [x, w, b]), [dy.double()])
    base_out, base_grads = _grads(torch_ln, [x, w, b], [dy])
    _check_all("out", out, ref_out, base_out)
    _check_all("grad", grads, ref_grads, base_grads)
    y = ops.rms_norm(x, (3, 5), w)
    assert_kernel_close(y, F.rms_norm(x.double(), (3, 5), w.double()), F.rms_norm(x, (3, 5), w), name="rms (3, 5)")


def test_largest_hidden_size(backend):
    n, dev = 65536, backend.device
    x = torch.randn(2, n, device=dev)
    w = torch.randn(n, device=dev)
    got = ops.rms_norm(x, (n,), w, eps=1e-6)
    ref = F.rms_norm(x.double(), (n,), w.double(), 1e-6)
    assert_kernel_close(got, ref, F.rms_norm(x, (n,), w, 1e-6), name="rms 65536")


def test_float64_runs_on_reference(backend, monkeypatch):
    """fp64 is not a kernel dtype: non-reference backends fall back to the reference with one warning."""
    monkeypatch.setattr(backends, "_WARNED", set())
    x = torch.randn(3, 17, dtype=torch.float64, device=backend.device)
    w = torch.randn(17, dtype=torch.float64, device=backend.device)
    if backend.name == "reference":
        got = ops.layer_norm(x, (17,), w)
    else:
        with pytest.warns(RuntimeWarning, match=r"norm_fwd: using the reference backend because x is float64"):
            got = ops.layer_norm(x, (17,), w)
    assert got.dtype == torch.float64
    assert_close(got, F.layer_norm(x, (17,), w), atol=1e-12, name="fp64 layer_norm")


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("width", ["narrow", "wide"])
def test_backward_is_deterministic(backend, kind, width):
    """Rows spread over several programs / chunks: gradients match torch, and repeated backward passes
    (on the cpu backend also with another thread count) give bit-identical results."""
    dev = backend.device
    if width == "wide":
        m, n = 9, 5000
    else:
        m, n = (150, 1000) if backend.interpreted else (600, 128)
    x = torch.randn(m, n, device=dev)
    w = torch.randn(n, device=dev)
    b = torch.randn(n, device=dev) if kind == "layer" else None
    dy = torch.randn(m, n, device=dev)

    def grads():
        return _grads(lambda *t: _norm(ops, kind, *t, 1e-5), [x, w, b], [dy])[1]

    first = grads()
    _, ref = _grads(lambda *t: _norm(F, kind, *t, 1e-5), _as(torch.float64, [x, w, b]), [dy.double()])
    _, base = _grads(lambda *t: _norm(F, kind, *t, 1e-5), [x, w, b], [dy])
    _check_all("grad", first, ref, base)
    runs = [grads()]
    if backend.name == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            runs.append(grads())
        finally:
            torch.set_num_threads(threads)
    for run in runs:
        for a, c in zip(first, run, strict=True):
            if a is not None:
                assert torch.equal(a, c), f"gradients differ between runs: max diff {(a - c).abs().max().item():.3e}"


def test_opcheck_custom_ops(backend):
    dev = backend.device
    m, n = 5, 33
    for rms, with_residual, with_params in ((False, True, True), (True, False, False), (True, True, True)):
        x = torch.randn(m, n, device=dev, requires_grad=True)
        residual = torch.randn(m, n, device=dev, requires_grad=True) if with_residual else None
        w = torch.randn(n, device=dev, requires_grad=True) if with_params else None
        b = torch.randn(n, device=dev, requires_grad=True) if with_params and not rms else None
        torch.library.opcheck(torch.ops.llmkern.norm_fwd.default, (x, residual, w, b, 1e-5, rms))
        detached = [None if t is None else t.detach() for t in (x, residual, w, b)]
        out, residual_out, mean, rstd = torch.ops.llmkern.norm_fwd(*detached, 1e-5, rms)
        h = x.detach() if residual is None else residual_out
        dres = torch.randn(m, n, device=dev) if with_residual else None
        args = (torch.randn(m, n, device=dev), dres, h, None if w is None else w.detach(),
                None if b is None else b.detach(), mean, rstd, 1e-5, rms)
        torch.library.opcheck(torch.ops.llmkern.norm_bwd.default, args)


def test_torch_compile_fullgraph(backend):
    """A pre-norm block traced by torch.compile without graph breaks; same values and gradients as eager."""
    dev = backend.device

    def block(x, residual, w1, b1, w2):
        y, h = ops.add_layer_norm(x, residual, w1, b1)
        return ops.rms_norm(y * 2, (y.shape[-1],), w2, eps=1e-6), h

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    inputs = [torch.randn(2, 3, 40, device=dev), torch.randn(2, 3, 40, device=dev),
              torch.randn(40, device=dev), torch.randn(40, device=dev), torch.randn(40, device=dev)]
    cot = [torch.randn(2, 3, 40, device=dev), torch.randn(2, 3, 40, device=dev)]
    eager_out, eager_grads = _grads(block, inputs, cot)
    comp_out, comp_grads = _grads(compiled, inputs, cot)
    names = ["y", "h", "dx", "dres", "dw1", "db1", "dw2"]
    for name, a, e in zip(names, comp_out + comp_grads, eager_out + eager_grads, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


MODULE_CASES = [
    ("LayerNorm", (40,), {}),
    ("LayerNorm", (40,), {"bias": False}),
    ("LayerNorm", ((3, 40),), {"eps": 1e-6}),
    ("LayerNorm", (40,), {"elementwise_affine": False}),
    ("RMSNorm", (40,), {}),
    ("RMSNorm", (40,), {"eps": 1e-6}),
    ("RMSNorm", (40,), {"elementwise_affine": False}),
]


@pytest.mark.parametrize("name,args,kwargs", MODULE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(MODULE_CASES)])
def test_module_state_dict_round_trip(backend, name, args, kwargs):
    dev = backend.device
    theirs = getattr(torch.nn, name)(*args, **kwargs).to(dev)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours = getattr(llmkern.nn, name)(*args, **kwargs).to(dev)
    assert isinstance(ours, getattr(torch.nn, name))
    ours.load_state_dict(theirs.state_dict())
    back = getattr(torch.nn, name)(*args, **kwargs).to(dev)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    x = torch.randn(2, 3, 40, device=dev)
    dy = torch.randn_like(x)
    got, ref = [], []
    for module, out in ((ours, got), (theirs, ref)):
        xi = x.clone().requires_grad_(True)
        module.zero_grad()
        module(xi).backward(dy)
        out += [module(x).detach(), xi.grad] + [p.grad for p in module.parameters()]
    for i, (a, e) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, e, atol=2e-5, rtol=1e-5, name=f"{name}[{i}]")


def test_empty_input_gives_empty_result_and_gradients(backend):
    dev = backend.device
    for shape in ((0, 16), (2, 0, 16)):
        x = torch.randn(shape, device=dev, requires_grad=True)
        w = torch.randn(16, device=dev, requires_grad=True)
        b = torch.randn(16, device=dev, requires_grad=True)
        y = ops.layer_norm(x, (16,), w, b)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros(16, device=dev)) and torch.equal(b.grad, torch.zeros(16, device=dev))
    x = torch.randn(0, 8, device=dev, requires_grad=True)
    residual = torch.randn(0, 8, device=dev, requires_grad=True)
    out, h = ops.add_rms_norm(x, residual, None)
    assert out.shape == h.shape == (0, 8)
    (out.sum() + h.sum()).backward()
    assert x.grad.shape == residual.grad.shape == (0, 8)


BAD_INPUTS = [
    ("int x", lambda: ops.layer_norm(torch.ones(2, 8, dtype=torch.int64), (8,)), TypeError,
     r"layer_norm: x must have dtype in \(float32.*got int64"),
    ("int weight", lambda: ops.rms_norm(torch.randn(2, 8), (8,), torch.ones(8, dtype=torch.int32)), TypeError,
     r"rms_norm: weight must have dtype in .*got int32"),
    ("not a tensor", lambda: ops.rms_norm([1.0, 2.0], (2,)), TypeError,
     r"rms_norm: x must be a torch.Tensor, got list"),
    ("weight shape", lambda: ops.layer_norm(torch.randn(2, 8), (8,), torch.randn(9)), ValueError,
     r"layer_norm: weight must have shape \(8,\), got \(9,\)"),
    ("bias shape", lambda: ops.layer_norm(torch.randn(2, 8), (8,), None, torch.randn(2, 8)), ValueError,
     r"layer_norm: bias must have shape \(8,\), got \(2, 8\)"),
    ("residual shape", lambda: ops.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), None), ValueError,
     r"add_rms_norm: residual must have shape \(2, 8\), got \(3, 8\)"),
    ("normalized_shape", lambda: ops.layer_norm(torch.randn(2, 8), (4,)), ValueError,
     r"layer_norm: normalized_shape must be a non-empty suffix of x.shape \(2, 8\), got \(4,\)"),
    ("device", lambda: ops.layer_norm(torch.randn(2, 8), (8,), torch.randn(8, device="meta")), ValueError,
     r"layer_norm: all tensors must be on one device, got x on cpu, weight on meta"),
    ("too wide", lambda: ops.rms_norm(torch.randn(1, 65537), (65537,)), ValueError,
     r"rms_norm: the normalized size must be in \[1, 65536\], got 65537"),
    ("too wide add", lambda: ops.add_layer_norm(torch.randn(1, 65537), torch.randn(1, 65537), None, None), ValueError,
     r"add_layer_norm: the normalized size must be in \[1, 65536\], got 65537"),
    ("0-d", lambda: ops.layer_norm(torch.tensor(1.0), (1,)), ValueError, r"layer_norm: x must have at least 1 dims"),
]


@pytest.mark.parametrize("case,call,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(case, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_row_config():
    """The shared row-kernel helper: power-of-two blocks, warps growing with the tile, a clear cap."""
    from llmkern.backends.triton._launch import MAX_ROW, num_warps_for, row_config

    for n in (1, 7, 123, 1000, 4097, MAX_ROW):
        cfg = row_config("norm_fwd", n, m=1)
        assert cfg.block_m == 1 and cfg.chunks == 1
        assert n <= cfg.block_n < 2 * n + 1 and cfg.block_n & (cfg.block_n - 1) == 0
    assert row_config("norm_fwd", 100, m=3).block_m == 4
    warps = [num_warps_for(1 << k) for k in range(17)]
    assert warps == sorted(warps) and warps[0] == 1 and warps[-1] == 32
    wide = row_config("norm_fwd", 12289, m=8, max_block=4096)
    assert (wide.block_m, wide.block_n, wide.chunks) == (1, 4096, 4)
    with pytest.raises(ValueError, match=r"llmkern.norm_bwd: the row length \(hidden size\) must be in \[1, 65536\], "
                                         r"got 65537"):
        row_config("norm_bwd", MAX_ROW + 1)


def test_aot_specs_cover_every_kernel_argument():
    """Each ahead-of-time spec names every kernel argument once: runtime ones in order, constexprs apart."""
    from llmkern.backends.triton.norm import aot_specs

    specs = aot_specs()
    kernels = {"norm_fwd_kernel", "norm_bwd_kernel", "norm_fwd_wide_kernel", "norm_bwd_wide_kernel"}
    assert {s.fn.__name__ for s in specs} == kernels
    for spec in specs:
        names = list(spec.fn.arg_names)
        runtime = [a for a in names if a not in spec.constants]
        assert list(spec.signature) == runtime, spec.name
        assert set(spec.constants) | set(spec.signature) == set(names), spec.name
