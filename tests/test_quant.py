"""int8 block quantization (absmax / zero-point): kernels equal the reference bit for bit."""
from __future__ import annotations

import pytest
import torch

from llmkern import ops
from llmkern.reference import quant as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def qbackend(backend):
    if backend.name == "cpu":
        pytest.skip("int8 schemes have no C++ kernel: the cpu backend runs the reference (tested as 'reference')")
    return backend


def _reference(x, blocksize, symmetric):
    return reference.int8_quantize(x.reshape(-1), blocksize, symmetric)


@pytest.mark.parametrize("symmetric", (True, False), ids=("absmax", "zeropoint"))
@pytest.mark.parametrize("blocksize", (32, 64, 4096))
def test_int8_matches_reference(qbackend, blocksize, symmetric):
    for dtype in DTYPES:
        x = (torch.randn(3, blocksize + 5) * 3 + 0.5).to(qbackend.device, dtype)
        x[0, :blocksize] = 0  # an all-zero block
        q, scale, zero = ops.int8_quantize(x, blocksize, symmetric)
        rq, rscale, rzero = _reference(x, blocksize, symmetric)
        assert q.shape == x.shape and q.dtype == (torch.int8 if symmetric else torch.uint8)
        assert torch.equal(q.reshape(-1).cpu(), rq.cpu()) and torch.equal(scale.cpu(), rscale.cpu())
        assert zero is None if symmetric else torch.equal(zero.cpu(), rzero.cpu())
        for out_dtype in DTYPES:
            out = ops.int8_dequantize(q, scale, zero, blocksize, out_dtype)
            ref = reference.int8_dequantize(rq, rscale, rzero, blocksize, symmetric, out_dtype)
            assert out.shape == x.shape and torch.equal(out.reshape(-1).cpu(), ref.cpu())
        assert torch.all(ops.int8_dequantize(q, scale, zero, blocksize)[0, :blocksize] == 0)


def test_rounding_is_half_to_even(qbackend):
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, -126.5] + [0.0] * 24, device=qbackend.device)
    q, scale, _ = ops.int8_quantize(x, 32, True)
    assert float(scale[0]) == 1.0
    assert q[:8].tolist() == [127, 0, 2, 2, 0, -2, 3, -126]


@pytest.mark.parametrize("symmetric", (True, False), ids=("absmax", "zeropoint"))
def test_error_is_half_a_step_and_below_nf4(qbackend, symmetric):
    x = torch.randn(64, 256, device=qbackend.device)
    q, scale, zero = ops.int8_quantize(x, 64, symmetric)
    err = (ops.int8_dequantize(q, scale, zero, 64) - x).abs()
    step = scale.repeat_interleave(64).view(x.shape)
    assert torch.all(err <= step * 0.5001 + 1e-7)
    packed, state = ops.nf4_quantize(x, 64, False)
    nf4_err = (ops.nf4_dequantize(packed, state) - x).abs().mean()
    assert err.mean() < nf4_err / 4  # 8 bits vs 4: each extra bit halves the step


def test_zero_point_keeps_zero_exact(qbackend):
    x = torch.rand(4, 64, device=qbackend.device) + 0.25  # all positive: the range is widened to hold 0
    x[:, 5] = 0
    q, scale, zero = ops.int8_quantize(x, 64, False)
    out = ops.int8_dequantize(q, scale, zero, 64)
    assert torch.all(out[:, 5] == 0) and torch.all(zero == 0)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 64)
    q, scale, zero = ops.int8_quantize(x, 64, False)
    with pytest.raises(ValueError, match=r"int8_quantize: blocksize must be one of .* got 100"):
        ops.int8_quantize(x, 100)
    with pytest.raises(TypeError, match="int8_quantize: x must have dtype in"):
        ops.int8_quantize(x.long())
    with pytest.raises(ValueError, match="int8_quantize: x must have at least one element"):
        ops.int8_quantize(torch.zeros(0))
    with pytest.raises(TypeError, match="int8_dequantize: q must have dtype in \\(int8\\), got uint8"):
        ops.int8_dequantize(q, scale)
    with pytest.raises(ValueError, match=r"int8_dequantize: scale must have shape \(4,\), got \(3,\)"):
        ops.int8_dequantize(q, scale[:3], zero)
    with pytest.raises(TypeError, match="int8_dequantize: dtype must be one of"):
        ops.int8_dequantize(q, scale, zero, dtype=torch.int32)


def test_custom_ops_pass_opcheck(qbackend):
    x = torch.randn(300, device=qbackend.device)
    for symmetric in (True, False):
        torch.library.opcheck(torch.ops.llmkern.int8_quantize.default, (x, 64, symmetric))
        q, scale, zero = torch.ops.llmkern.int8_quantize(x, 64, symmetric)
        torch.library.opcheck(torch.ops.llmkern.int8_dequantize.default, (q, scale, zero, 64, symmetric, torch.bfloat16))
