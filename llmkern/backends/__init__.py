"""Backend selection and dispatch.

Every op family declares, once, where each backend's implementation lives::

    register("norm_fwd",
             triton="llmkern.backends.triton.norm:norm_fwd",
             cpu="llmkern.backends.cpu.norm:norm_fwd",
             reference="llmkern.reference.norm:norm_fwd")

and calls ``dispatch("norm_fwd", x)(...)``. Implementations are imported lazily, so importing llmkern
never imports Triton or compiles C++.

Selection (``LLMKERN_BACKEND`` or :func:`use_backend`):

* ``auto`` (default): CUDA tensors -> ``triton``; CPU tensors -> ``cpu`` where the C++ extension is
  built (and the op has a cpu implementation), else ``reference``.
* ``triton``: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before llmkern was
  imported (Triton reads it when a kernel is decorated).
* ``cpu``: CPU tensors through the C++ extension in ``csrc/``.
* ``reference``: pure PyTorch, any device.

An implementation may raise :class:`Unsupported` for an input it does not handle (an attention mask
kind, a dtype); the call then falls back to the next backend (``reference`` last) with one warning
per op and reason. ``LLMKERN_STRICT=1`` turns every fallback into a ``RuntimeError``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")

# Triton decides at decoration time whether a kernel is interpreted; record it at import, as Triton does.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_REGISTRY: dict[str, dict[str, str]] = {}
_LOADED: dict[tuple[str, str], Callable] = {}
_WARNED: set[tuple[str, str]] = set()
# use_backend() entries, innermost last: (token, name). Process-wide rather than per thread because
# autograd runs the backward of CUDA tensors on its own worker threads, which must see the choice too.
_CHOICES: list[tuple[object, str]] = []
_CHOICES_LOCK = threading.Lock()


class Unsupported(Exception):
    """Raised by a backend implementation for an input it does not handle; triggers a fallback."""


class ExtensionError(RuntimeError):
    """A C++ extension of csrc/ could not be built or loaded (no compiler, build error)."""


def require_dtypes(allowed: tuple[torch.dtype, ...], **tensors: torch.Tensor | None) -> None:
    """For backend implementations: raise :class:`Unsupported` naming the first given tensor whose dtype
    is not in ``allowed`` (``None`` entries are skipped), so that the call falls back to the reference."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise Unsupported(f"{name} is {str(t.dtype).replace('torch.', '')} (this backend takes {names})")


def register(op: str, **impls: str) -> None:
    """Declare the implementations of ``op``: ``backend="module.path:function"`` for each backend."""
    unknown = set(impls) - set(BACKENDS[1:])
    if unknown:
        raise ValueError(f"register({op!r}): unknown backends {sorted(unknown)}; expected {BACKENDS[1:]}")
    if "reference" not in impls:
        raise ValueError(f"register({op!r}): every op needs a reference implementation")
    _REGISTRY[op] = dict(impls)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"llmkern backend: expected one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``LLMKERN_BACKEND``, else ``auto``."""
    with _CHOICES_LOCK:
        if _CHOICES:
            return _CHOICES[-1][1]
    return _check_name(os.environ.get("LLMKERN_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects the backend for ops called inside it, backward passes included.

    The choice is process-wide (autograd runs CUDA backward passes on its own threads); nested uses
    restore the enclosing choice on exit.
    """
    _check_name(name)
    token = object()
    with _CHOICES_LOCK:
        _CHOICES.append((token, name))
    try:
        yield
    finally:
        with _CHOICES_LOCK:
            _CHOICES[:] = [entry for entry in _CHOICES if entry[0] is not token]


def strict() -> bool:
    return os.environ.get("LLMKERN_STRICT", "0") == "1"


def fallback(op: str, reason: str, to: str) -> None:
    """Report a fallback of ``op`` to backend ``to``: warn once per (op, reason), or raise under strict."""
    if strict():
        raise RuntimeError(f"llmkern.{op}: falling back to {to} because {reason} (LLMKERN_STRICT=1 forbids fallbacks)")
    key = (op, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"llmkern.{op}: using the {to} backend because {reason}", RuntimeWarning, stacklevel=3)


def _load(op: str, backend: str) -> Callable:
    key = (op, backend)
    fn = _LOADED.get(key)
    if fn is None:
        module, _, attr = _REGISTRY[op][backend].partition(":")
        fn = getattr(importlib.import_module(module), attr)
        _LOADED[key] = fn
    return fn


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "Triton is not installed"
        return True, ""
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return True, ""
        return False, "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing llmkern"
    return False, f"Triton has no backend for {device.type} tensors"


def resolve(op: str, device: torch.device) -> str:
    """The backend that ``op`` runs on for tensors on ``device``, before any per-input fallback."""
    if op not in _REGISTRY:
        raise KeyError(f"llmkern: no op named {op!r}; registered: {registered_ops()}")
    impls = _REGISTRY[op]
    name = current_backend()
    if name == "reference":
        return "reference"
    if name == "auto":
        if device.type == "cuda" and "triton" in impls and _triton_usable(device)[0]:
            return "triton"
        if device.type == "cpu" and "cpu" in impls:
            try:
                _load(op, "cpu")
                return "cpu"
            except ExtensionError as exc:
                fallback(op, str(exc), "reference")
        return "reference"
    if name == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            raise RuntimeError(f"llmkern.{op}: LLMKERN_BACKEND=triton cannot run here: {why}")
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"llmkern.{op}: the cpu backend takes CPU tensors, got {device.type} tensors")
        if name in impls:
            try:
                _load(op, "cpu")
            except ExtensionError as exc:
                raise RuntimeError(f"llmkern.{op}: the cpu backend was asked for but {exc}") from exc
    if name not in impls:
        fallback(op, f"it has no {name} implementation", "reference")
        return "reference"
    return name


def dispatch(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``device``. If it raises :class:`Unsupported`, the reference runs."""
    backend = resolve(op, device)
    fn = _load(op, backend)
    if backend == "reference":
        return fn
    ref = _load(op, "reference")

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Unsupported as exc:
            fallback(op, str(exc), "reference")
            return ref(*args, **kwargs)

    return call
