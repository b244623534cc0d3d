"""The ``llmkern`` command line, ``llmkern bench`` on a small benchmark directory, and ``bench/gpu_suite.sh``
on a machine without a GPU (it must refuse loudly) and in its dry-run mode."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llmkern.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"

TINY_BENCH = '''
import pytest
import torch


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("n", [1000, 20000, 10**10])
@pytest.mark.parametrize("provider", ["llmkern", "torch", "python"])
def test_sum(benchmark, peak_memory, throughput, provider, n, mode):
    if n > 10**9:
        pytest.skip("a size for a bigger machine")
    x = torch.randn(n)
    fn = {"llmkern": lambda: x.sum(), "torch": lambda: torch.sum(x), "python": lambda: sum(x.tolist())}[provider]
    benchmark.pedantic(fn, rounds=3, iterations=2)
    throughput(bytes=x.numel() * x.element_size())
    peak_memory(lambda: torch.ones(2**22), "cpu")  # 16 MiB: large enough to be mapped (and seen) on its own
'''


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name in ("info", "check", "bench", "kernels"):
        assert name in COMMANDS and name in printed


@pytest.mark.parametrize("command", ["check", "bench", "kernels"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--json" in capsys.readouterr().out


@pytest.fixture
def tiny_bench(tmp_path) -> Path:
    bench = tmp_path / "bench"
    bench.mkdir()
    shutil.copy(ROOT / "bench" / "conftest.py", bench / "conftest.py")
    (bench / "bench_tiny.py").write_text(TINY_BENCH)
    return bench


def test_bench_runs_pytest_benchmark_and_reports_ratios(tiny_bench, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    status = main(["bench", "--bench-dir", str(tiny_bench), "--quick", "--json", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    data = json.loads(out.read_text())
    raw = data["pytest_benchmark"]["benchmarks"]
    # --quick runs every provider and mode of the last case that runs here (n=20000; n=1e10 skips).
    assert sorted((b["params"]["provider"], b["params"]["mode"]) for b in raw) == sorted(
        (p, m) for p in ("llmkern", "torch", "python") for m in ("fwd", "fwd+bwd"))
    assert {b["params"]["n"] for b in raw} == {20000}
    median = {(b["params"]["provider"], b["params"]["mode"]): b["stats"]["median"] for b in raw}
    assert len(data["ratios"]) == 4
    for r in data["ratios"]:
        mode = r["case"].split("mode=")[1]
        assert r["case"] == f"n=20000 mode={mode}" and r["peer"] in ("torch", "python")
        assert r["speedup"] == pytest.approx(median[(r["peer"], mode)] / median[("llmkern", mode)])
        assert r["throughput"].endswith("GB/s")
        assert r["llmkern_peak_mb"] == pytest.approx(16, rel=0.25)
    for b in raw:
        assert b["extra_info"]["machine"] and b["extra_info"]["date"] and b["extra_info"]["GB/s"] > 0
    assert data["machine_info"]["torch"] == torch.__version__ and data["machine"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "speedup" in printed and "bench_tiny::test_sum" in printed

    again = tmp_path / "again.json"
    assert main(["bench", "--from-json", str(out), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["ratios"] == data["ratios"]


def test_bench_without_benchmark_files_says_where_they_are(tmp_path, capsys):
    assert main(["bench", "--bench-dir", str(tmp_path)]) == 2
    assert "source tree" in capsys.readouterr().out


def _no_gpu_env(tmp_path, fake_smi: bool) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "python3", "date", "sed", "awk", "head", "env", "timeout", "tee", "mkdir"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    if fake_smi:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: Pretend GPU (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    return {**os.environ, "PATH": str(bin_dir)}


cuda_machine = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@cuda_machine
@pytest.mark.parametrize("fake_smi", [False, True], ids=["no-nvidia-smi", "torch-without-cuda"])
def test_gpu_suite_fails_loudly_without_a_gpu(tmp_path, fake_smi):
    out_dir = tmp_path / "results"
    result = subprocess.run(["bash", str(SUITE), str(out_dir)], env=_no_gpu_env(tmp_path, fake_smi),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NO CUDA GPU" in result.stderr
    assert ("torch does not see a CUDA device" if fake_smi else "nvidia-smi is not on PATH") in result.stderr
    assert not out_dir.exists()


@cuda_machine
def test_gpu_suite_dry_run_lists_the_stages(tmp_path):
    result = subprocess.run(["bash", str(SUITE), "--dry-run", str(tmp_path / "out")], env=_no_gpu_env(tmp_path, False),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "GPU check: FAILS" in lines[1]
    stages = [line.split()[1] for line in lines if line.startswith("stage ")]
    assert stages == ["info", "check", "tests", "bench", "kernels"]
    assert "LLMKERN_BACKEND=triton" in result.stdout and "bench --quick" in result.stdout
    assert not (tmp_path / "out").exists()
