"""Backend selection and dispatch (DESIGN.md "Backend selection"): LLMKERN_BACKEND, use_backend(),
info(), warn-once fallbacks, LLMKERN_STRICT=1, and the error for Triton on CPU tensors without the
interpreter. The norm ops serve as the real op under test; fp64 input is their real fallback case.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import llmkern
from llmkern import backends, ops
from llmkern.backends import ExtensionError, resolve, use_backend
import llmkern.backends.cpu as cpu_backend

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which fallbacks already warned, so this test sees its first warning."""
    monkeypatch.setattr(backends, "_WARNED", set())


def _llmkern_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("llmkern.")]


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    assert llmkern.current_backend() == "reference"
    assert resolve("norm_fwd", CPU) == "reference"
    monkeypatch.setenv("LLMKERN_BACKEND", " CPU ")
    assert llmkern.current_backend() == "cpu"
    assert resolve("norm_fwd", CPU) == "cpu"
    monkeypatch.setenv("LLMKERN_BACKEND", "")
    assert llmkern.current_backend() == "auto"
    monkeypatch.setenv("LLMKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"llmkern backend: expected one of "
                                         r"\('auto', 'triton', 'cpu', 'reference'\), got 'cuda'"):
        llmkern.current_backend()


def test_auto_runs_cpu_tensors_on_the_cpp_extension(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "auto")
    assert resolve("norm_fwd", CPU) == "cpu"
    assert resolve("norm_bwd", CPU) == "cpu"


def test_use_backend_nests_restores_and_overrides_env(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "cpu")
    with use_backend("reference"):
        assert llmkern.current_backend() == "reference"
        with use_backend("auto"):
            assert llmkern.current_backend() == "auto"
        assert llmkern.current_backend() == "reference"
        with pytest.raises(ValueError, match="got 'fast'"):
            with use_backend("fast"):
                pass
        assert llmkern.current_backend() == "reference"
    assert llmkern.current_backend() == "cpu"


def test_use_backend_reaches_other_threads():
    """Autograd runs CUDA backward passes on its own threads: they must see the selected backend."""
    seen = []
    with use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.append(llmkern.current_backend()))
        worker.start()
        worker.join()
    assert seen == ["reference"]


def test_info_reports_backends_and_build_state(monkeypatch):
    # Only the norm ops: resolving every registered op under auto would build every family's extension.
    monkeypatch.setattr(backends, "_REGISTRY", {op: backends._REGISTRY[op] for op in ("norm_fwd", "norm_bwd")})
    with use_backend("auto"):
        resolve("norm_fwd", CPU)  # builds (or loads) the norm extension
        data = llmkern.info()
    keys = ("llmkern", "torch", "triton", "device", "backend", "triton_interpreted", "strict", "ops", "cpu_extensions")
    for key in keys:
        assert key in data, key
    assert data["backend"] == "auto"
    assert data["triton_interpreted"] is backends.TRITON_INTERPRET
    assert data["ops"]["norm_fwd"]["cpu"] == "cpu"
    assert data["ops"]["norm_bwd"]["cpu"] == "cpu"
    assert data["cpu_extensions"]["norm"] == "built"


def test_fallback_warns_once_per_op_and_reason(backend, fresh_warnings):
    x = torch.randn(4, 9, dtype=torch.float64, device=backend.device)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = ops.rms_norm(x, (9,))
        second = ops.rms_norm(x, (9,))
    messages = _llmkern_warnings(record)
    if backend.name == "reference":
        assert messages == []
    else:
        assert messages == ["llmkern.norm_fwd: using the reference backend because x is float64 "
                            "(this backend takes float32, float16, bfloat16)"]
    assert torch.equal(first, second)
    torch.testing.assert_close(first, torch.nn.functional.rms_norm(x, (9,)), rtol=1e-12, atol=1e-12)


def test_strict_turns_fallback_into_error(backend, fresh_warnings, monkeypatch):
    monkeypatch.setenv("LLMKERN_STRICT", "1")
    x = torch.randn(4, 9, dtype=torch.float64, device=backend.device)
    if backend.name == "reference":
        assert ops.layer_norm(x, (9,)).dtype == torch.float64
        return
    with pytest.raises(RuntimeError, match=r"llmkern.norm_fwd: falling back to reference because x is float64 .*"
                                           r"\(LLMKERN_STRICT=1 forbids fallbacks\)"):
        ops.layer_norm(x, (9,))


def test_extension_build_failure_falls_back_under_auto(monkeypatch, fresh_warnings):
    real_load = backends._load

    def broken(op, backend):
        if backend == "cpu":
            raise ExtensionError("the C++ extension 'norm' could not be built (no compiler)")
        return real_load(op, backend)

    monkeypatch.setattr(backends, "_load", broken)
    monkeypatch.setenv("LLMKERN_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match=r"llmkern.norm_fwd: using the reference backend because the C\+\+ ext"):
        assert resolve("norm_fwd", CPU) == "reference"
    with use_backend("cpu"), pytest.raises(RuntimeError, match=r"llmkern.norm_fwd: the cpu backend was asked for but"):
        resolve("norm_fwd", CPU)
    monkeypatch.setenv("LLMKERN_STRICT", "1")
    with pytest.raises(RuntimeError, match="LLMKERN_STRICT=1 forbids fallbacks"):
        resolve("norm_fwd", CPU)


def test_missing_extension_source_is_an_extension_error(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_ERRORS", {})
    with pytest.raises(ExtensionError, match=r"the C\+\+ extension 'no_such_family' could not be built "
                                             r".*no_such_family.cpp is missing"):
        cpu_backend.load_extension("no_such_family")
    assert "no_such_family" in cpu_backend.extension_status()


def test_cpu_backend_refuses_other_devices():
    with use_backend("cpu"), pytest.raises(RuntimeError, match="the cpu backend takes CPU tensors, got meta tensors"):
        resolve("norm_fwd", torch.device("meta"))


def test_registry_rejects_bad_declarations():
    with pytest.raises(ValueError, match=r"register\('x'\): unknown backends \['cuda'\]"):
        backends.register("x", cuda="m:f", reference="m:f")
    with pytest.raises(ValueError, match=r"register\('x'\): every op needs a reference implementation"):
        backends.register("x", cpu="m:f")
    with pytest.raises(KeyError, match="no op named 'nonexistent'"):
        resolve("nonexistent", CPU)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """TRITON_INTERPRET is read when llmkern is imported, so this runs in a fresh interpreter."""
    script = (
        "import torch, llmkern\n"
        "assert llmkern.backends.TRITON_INTERPRET is False\n"
        "try:\n"
        "    llmkern.ops.layer_norm(torch.randn(2, 8), (8,))\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LLMKERN_BACKEND"] = "triton"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("llmkern.norm_fwd: LLMKERN_BACKEND=triton cannot run here: Triton runs CPU tensors "
                                   "only in its interpreter: set TRITON_INTERPRET=1 before importing llmkern")
