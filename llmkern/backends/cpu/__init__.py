"""The C++ CPU backend: kernels in csrc/, compiled on first use with ninja and cached.

Each op family is one translation unit ``csrc/<family>.cpp`` built as its own extension
``llmkern_<family>_cpu`` (so one family's build problem never takes down another's). The build is
cached by torch in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); the first call
takes about a minute on two cores, later imports are instant.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from types import ModuleType

from llmkern.backends import ExtensionError

_MODULES: dict[str, ModuleType] = {}
_ERRORS: dict[str, str] = {}
_LOCK = threading.Lock()


def csrc_dir() -> Path:
    """Where the C++ sources are: the installed package data, or csrc/ of a source checkout."""
    spec = importlib.util.find_spec("llmkern._csrc")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if Path(loc).is_dir():
                return Path(loc)
    return Path(__file__).resolve().parents[3] / "csrc"


def load_extension(family: str) -> ModuleType:
    """Build (once, cached) and import the extension for ``csrc/<family>.cpp``.

    Raises :class:`ExtensionError` with the compiler's complaint when it cannot be built.
    """
    with _LOCK:
        if family in _MODULES:
            return _MODULES[family]
        if family in _ERRORS:
            raise ExtensionError(_ERRORS[family])
        source = csrc_dir() / f"{family}.cpp"
        try:
            if not source.is_file():
                raise FileNotFoundError(f"{source} is missing")
            from torch.utils import cpp_extension

            flags = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno"]
            module = cpp_extension.load(
                name=f"llmkern_{family}_cpu",
                sources=[str(source)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=os.environ.get("LLMKERN_VERBOSE_BUILD", "0") == "1",
            )
        except Exception as exc:  # compiler missing, build error, import error: all mean "not available"
            message = f"the C++ extension {family!r} could not be built ({type(exc).__name__}: {str(exc).strip()[-500:]})"
            _ERRORS[family] = message
            raise ExtensionError(message) from exc
        _MODULES[family] = module
        return module


def extension_status() -> dict[str, str]:
    """Build state of every extension tried so far: ``"built"`` or the error."""
    status = {name: "built" for name in _MODULES}
    status.update(_ERRORS)
    return status
