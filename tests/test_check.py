"""``llmkern check``: passes on every backend under test, and marks a kernel made wrong on purpose.

Runs in both CI passes: the default pass checks the reference and cpu backends, the interpreted pass
the Triton kernels in the interpreter; ``--quick`` (the first standard and the first odd shape of each
op) keeps CI's time, the full shape list runs with ``llmkern check``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from llmkern import backends
from llmkern.backends import TRITON_INTERPRET, Unsupported
from llmkern.cli import main
from llmkern.tools import cases as case_lib
from llmkern.tools.numerics import ATOL, RATIO, exact_verdict, kernel_verdict

NORM_ARGS = ["--family", "norm", "--op", "layer_norm", "--quick", "--no-quantization"]


def _check(backend, tmp_path, *args) -> tuple[int, dict, str]:
    out = tmp_path / "check.json"
    status = main(["check", "--backend", backend.name, "--json", str(out), *args])
    return status, json.loads(out.read_text()), out


def _rows(data, **match) -> list[dict]:
    return [r for r in data["rows"] if all(r[k] == v for k, v in match.items())]


def test_check_passes_for_every_installed_op(backend, tmp_path, capsys):
    status, data, _ = _check(backend, tmp_path, "--quick", "--no-quantization")
    printed = capsys.readouterr().out
    bad = [r for r in data["rows"] if r["status"] not in ("PASS", "SKIP")]
    assert status == 0 and not bad, "\n".join(f"{r['status']} {r['op']} {r['mode']} {r['shape']} {r['dtype']}: "
                                             f"{r['note']}" for r in bad) or printed
    families = case_lib.families()
    assert [f.name for f in families] == list(case_lib.FAMILIES)
    for fam in families:
        ops = {c.op for c in fam.cases}
        passed = {r["op"] for r in data["rows"] if r["status"] == "PASS"}
        assert ops & passed, f"no {fam.name} op was checked on {backend.name}: {sorted(ops)}"
    kernel_rows = [r for r in data["rows"] if r["tolerance"] is not None]
    assert {r["mode"] for r in kernel_rows} >= {"fwd", "bwd:dx", "bwd:dweight"}
    assert all(r["max_abs"] <= r["tolerance"] for r in kernel_rows)
    assert data["machine"]["date"] and data["machine"]["device"]
    assert f"{sum(r['status'] == 'PASS' for r in data['rows'])} PASS" in printed


def _patch(monkeypatch, op: str, backend_name: str, wrap):
    """Replace the implementation of ``op`` that dispatch hands out for ``backend_name``."""
    real = backends._load(op, backend_name)
    monkeypatch.setitem(backends._LOADED, (op, backend_name), wrap(real))


def test_check_marks_a_wrong_forward_kernel(backend, tmp_path, monkeypatch, capsys):
    def wrong(real):
        def norm_fwd(x, *args):
            out, *rest = real(x, *args)
            return (out * 1.05, *rest)  # 5% off: far outside every dtype's tolerance
        return norm_fwd

    _patch(monkeypatch, "norm_fwd", backend.name, wrong)
    status, data, _ = _check(backend, tmp_path, *NORM_ARGS)
    printed = capsys.readouterr().out
    assert status == 1
    fwd, bwd = _rows(data, mode="fwd"), [r for r in data["rows"] if r["mode"].startswith("bwd")]
    assert fwd and all(r["status"] == "FAIL" and r["max_abs"] > r["tolerance"] for r in fwd)
    assert bwd and all(r["status"] == "PASS" for r in bwd), "the backward does not use the perturbed output"
    fail_lines = [line for line in printed.splitlines() if line.startswith("layer_norm") and line.endswith("FAIL")]
    assert len(fail_lines) == len(fwd) and all(line.split()[1] == "fwd" for line in fail_lines)
    assert f"{len(bwd)} PASS {len(fwd)} FAIL" in printed


def test_check_marks_a_wrong_backward_kernel(backend, tmp_path, monkeypatch):
    def wrong(real):
        def norm_bwd(*args):
            dh, dw, db = real(*args)
            return dh * 1.05, dw, db
        return norm_bwd

    _patch(monkeypatch, "norm_bwd", backend.name, wrong)
    status, data, _ = _check(backend, tmp_path, *NORM_ARGS)
    assert status == 1
    assert {r["status"] for r in _rows(data, mode="bwd:dx")} == {"FAIL"}
    assert {r["status"] for r in _rows(data, mode="fwd")} == {"PASS"}
    assert {r["status"] for r in _rows(data, mode="bwd:dweight")} == {"PASS"}


def test_check_reports_a_crashing_kernel_as_error(backend, tmp_path, monkeypatch, capsys):
    def crashing(real):
        def norm_fwd(*args):
            raise RuntimeError("kernel exploded on purpose")
        return norm_fwd

    _patch(monkeypatch, "norm_fwd", backend.name, crashing)
    status, data, _ = _check(backend, tmp_path, *NORM_ARGS)
    assert status == 1
    assert data["rows"] and all(r["status"] == "ERROR" and "exploded" in r["note"] for r in data["rows"])
    assert "ERROR: layer_norm fwd" in capsys.readouterr().out


def test_check_shows_a_fallback_instead_of_a_pass(backend, tmp_path, monkeypatch):
    if backend.name == "reference":
        pytest.skip("the reference is the last resort: it has nothing to fall back to")

    def unsupported(real):
        def norm_fwd(*args):
            raise Unsupported("made unsupported on purpose")
        return norm_fwd

    _patch(monkeypatch, "norm_fwd", backend.name, unsupported)
    status, data, _ = _check(backend, tmp_path, *NORM_ARGS)
    fwd = _rows(data, mode="fwd")
    assert fwd and all(r["status"] == "FALLBACK" and "made unsupported" in r["note"] for r in fwd)
    assert status == 0  # the result was right (the reference ran), but no row claims a PASS for it


def test_check_marks_wrong_quantization_bytes(backend, tmp_path, monkeypatch):
    nf4, = case_lib.families(["nf4"])
    if backend.name == "reference" and nf4.module.bnb_functional(backend.device) is None:
        pytest.skip("without bitsandbytes the reference's quantization has nothing independent to be checked against")

    def wrong(real):
        def nf4_quantize(x, blocksize):
            packed, absmax = real(x, blocksize)
            return packed ^ 1, absmax  # one flipped bit in every byte
        return nf4_quantize

    _patch(monkeypatch, "nf4_quantize", backend.name, wrong)
    status, data, _ = _check(backend, tmp_path, "--family", "nf4", "--op", "nf4_quantize", "--quick",
                             "--dtype", "float32", "--no-quantization")
    assert status == 1
    assert {r["status"] for r in _rows(data, mode="packed")} == {"FAIL"}
    assert {r["status"] for r in _rows(data, mode="absmax")} == {"PASS"}


@pytest.mark.skipif(TRITON_INTERPRET or torch.cuda.is_available(), reason="Triton can run here")
def test_check_refuses_a_backend_that_cannot_run(capsys):
    assert main(["check", "--backend", "triton"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().out


def test_quantization_error_table_orders_the_schemes():
    nf4, = case_lib.families(["nf4"])
    rows = {r["scheme"]: r for r in nf4.module.quantization_error(torch.device("cpu"), shape=(256, 256))}
    n, bs = 256 * 256, 64
    # Storage: 4-bit codes + per-block float32 absmax, or 8-bit codes when double-quantized (+ float32 per 256 blocks).
    assert math.isclose(rows["NF4"]["bits_per_param"], 4 + 32 / bs)
    nested = 32 * math.ceil(n / bs / 256) / n + 32 / n  # float32 scale per 256 blocks, float32 offset
    assert math.isclose(rows["NF4 + double quant"]["bits_per_param"], 4 + 8 / bs + nested)
    assert math.isclose(rows["int8 absmax"]["bits_per_param"], 8 + 32 / bs)
    assert math.isclose(rows["int8 zero-point"]["bits_per_param"], 8 + 40 / bs)
    # 8 bits per value leave ~16x less error than 4; zero-point spends a code on 0, absmax is symmetric.
    assert rows["int8 absmax"]["rmse_rel"] * 8 < rows["NF4"]["rmse_rel"]
    assert rows["int8 zero-point"]["rmse_rel"] * 8 < rows["NF4"]["rmse_rel"]
    assert rows["NF4 + double quant"]["rmse_rel"] < rows["NF4"]["rmse_rel"] * 1.02
    for r in rows.values():
        assert math.isclose(r["sqnr_db"], -20 * math.log10(r["rmse_rel"]), rel_tol=1e-3)


def test_kernel_verdict_applies_the_2x_rule():
    ref = torch.linspace(-2, 2, 101, dtype=torch.float64)
    baseline = (ref + 1e-3).float()
    bound = RATIO * (baseline.double() - ref).abs().max().item() + ATOL[torch.float32]
    ok = kernel_verdict((ref + 0.9 * bound).float(), ref, baseline)
    bad = kernel_verdict((ref + 1.1 * bound).float(), ref, baseline)
    assert ok.ok and not bad.ok
    assert math.isclose(ok.bound, bound, rel_tol=1e-6) and math.isclose(bad.max_abs, 1.1 * bound, rel_tol=1e-4)
    nan = ref.float().clone()
    nan[3] = float("nan")
    assert not kernel_verdict(nan, ref, baseline).ok


def test_exact_verdict_needs_same_bits():
    a = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert exact_verdict(a, a.clone()).ok
    assert not exact_verdict(a, torch.tensor([1, 2, 4], dtype=torch.uint8)).ok
    assert not exact_verdict(a, a.to(torch.int8)).ok
    f = torch.tensor([1.0, float("nan")])
    assert exact_verdict(f, f.clone()).ok
    assert not exact_verdict(f, torch.tensor([1.0 + 2**-23, float("nan")])).ok
