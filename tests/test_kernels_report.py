"""``llmkern kernels``: every Triton kernel's default configurations compile for sm_80 and sm_90
without register spills and within shared memory; the report detects spills, shared-memory overflow
and tensor-core use on kernels built to show them.

Compiles for real GPU targets, which needs the kernels as ``@triton.jit`` functions: skipped in the
interpreted pass (``TRITON_INTERPRET=1``), where they are interpreted functions. Reports are cached
by kernel source hash (``~/.cache/llmkern/kernels``), so only changed kernels are recompiled.
"""
from __future__ import annotations

import json
import os

import pytest

from llmkern.backends import TRITON_INTERPRET

pytestmark = pytest.mark.skipif(TRITON_INTERPRET, reason="compiles for sm_80/sm_90; under TRITON_INTERPRET=1 "
                                "the kernels are interpreted functions (the default pass runs this)")

if not TRITON_INTERPRET:
    import triton
    import triton.language as tl

    from llmkern.backends.triton._aot import AotSpec
    from llmkern.tools import kernels
    from llmkern.cli import main

    @triton.jit
    def _row_scale_kernel(X, Y, N, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + row * N + offs, mask=offs < N, other=0.0).to(tl.float32)
        tl.store(Y + row * N + offs, x * scale, mask=offs < N)

    @triton.jit
    def _matmul_kernel(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(B + (k + rk)[:, None] * BN + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(C + rm[:, None] * BN + rn[None, :], acc)


def _row_spec(block: int, num_warps: int) -> "AotSpec":
    return AotSpec(name=f"row_scale[BLOCK={block}]", fn=_row_scale_kernel,
                   signature={"X": "*fp32", "Y": "*fp32", "N": "i32", "scale": "fp32"},
                   constants={"BLOCK": block}, num_warps=num_warps)


def _matmul_spec(bm: int, bn: int, bk: int, num_warps: int, num_stages: int) -> "AotSpec":
    return AotSpec(name=f"matmul[{bm}x{bn}x{bk}, stages={num_stages}]", fn=_matmul_kernel,
                   signature={"A": "*fp16", "B": "*fp16", "C": "*fp32", "K": "i32"},
                   constants={"BM": bm, "BN": bn, "BK": bk}, num_warps=num_warps, num_stages=num_stages)


def test_every_default_config_compiles_without_spills_within_shared_memory():
    reports, notes = kernels.report_all(["sm_80", "sm_90"], jobs=os.cpu_count() or 1)
    assert not notes, "families whose kernels are not reported:\n" + "\n".join(notes)
    families = {r.family for r in reports}
    assert "norm" in families, f"the norm kernels are missing from the report: {sorted(families)}"
    errors = [f"{r.family} {r.name} {r.arch}: {r.note}" for r in reports if r.status == "ERROR"]
    assert not errors, "configurations that do not compile:\n" + "\n".join(errors)
    bad = [f"{r.family} {r.name} {r.arch}: {r.note}" for r in kernels.failing_defaults(reports)]
    assert not bad, f"{len(bad)} default configurations fail:\n" + "\n".join(bad)
    assert all(r.registers and r.registers <= 255 for r in reports)


def test_report_reads_registers_and_no_spills_from_a_small_kernel():
    for arch in ("sm_80", "sm_90"):
        report = kernels.compile_spec("test", _row_spec(1024, 4), arch)
        assert report.status == "OK", report.note
        assert 8 <= report.registers <= 255
        assert report.spills == 0 and report.shared < report.shared_limit
        assert report.tensor_cores == "-"
        assert report.blocks_per_sm >= 1


def test_report_flags_a_spilling_config():
    # 32 warps = 1024 threads cap ptxas at 64 registers; a 64K-element fp32 row is 64 values per thread
    # before the address arithmetic, so the rest must spill.
    report = kernels.compile_spec("test", _row_spec(65536, 32), "sm_90")
    assert report.status == "FAIL", report
    assert report.spill_stores > 0 and report.spill_loads > 0
    assert "spills" in report.note


def test_report_flags_shared_memory_over_the_arch_limit_and_sees_tensor_cores():
    small = {arch: kernels.compile_spec("test", _matmul_spec(64, 64, 32, 4, 2), arch) for arch in ("sm_80", "sm_90")}
    assert small["sm_80"].status == "OK" and small["sm_80"].tensor_cores == "mma", small["sm_80"]
    assert small["sm_90"].status == "OK" and small["sm_90"].tensor_cores == "wgmma", small["sm_90"]
    # 4 stages of a 256x256 and a 256x128 fp16 tile pipeline need more than sm_80's 163 KB per block.
    big = kernels.compile_spec("test", _matmul_spec(256, 128, 256, 8, 4), "sm_80")
    assert big.shared > kernels.SMEM_PER_BLOCK[80], big
    assert big.status == "FAIL" and "shared memory" in big.note


def test_kernels_command_writes_the_report(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    status = main(["kernels", "--family", "norm", "--arch", "sm_90", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["archs"] == ["sm_90"] and data["machine"]["date"]
    names = {k["name"] for k in data["kernels"]}
    assert any(n.startswith("norm_fwd") for n in names) and any(n.startswith("norm_bwd") for n in names)
    assert all(k["arch"] == "sm_90" and k["family"] == "norm" for k in data["kernels"])
    failing = [k for k in data["kernels"] if k["status"] != "OK"]
    assert status == (1 if any(not k["autotune"] or k["status"] == "ERROR" for k in failing) else 0), printed
    for k in failing:
        assert f"{k['status']}: norm {k['name']} sm_90: {k['note']}" in printed
    assert f"{len(data['kernels'])} configurations (" in printed


def test_parse_ptxas_sums_functions_and_takes_the_max_registers():
    log = ("ptxas info    : Function properties for f\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 384 bytes cmem[0]\n"
           "ptxas info    : Function properties for g\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 72 registers, used 0 barriers\n")
    assert kernels.parse_ptxas(log) == {"registers": 72, "stack": 8, "spill_stores": 4, "spill_loads": 4,
                                        "static_smem": 1024}
    with pytest.raises(ValueError, match="no register count"):
        kernels.parse_ptxas("ptxas fatal : something broke")


def test_occupancy_estimate_follows_the_limits():
    # 255 registers x 256 threads leave room for one block; 32 registers x 128 threads hit the block cap.
    assert kernels.blocks_per_sm(90, 255, 0, 8) == 1
    assert kernels.blocks_per_sm(90, 32, 0, 4) == 16
    assert kernels.blocks_per_sm(80, 32, 100 * 1024, 4) == 1
