"""Measured peak memory: the CUDA allocator on GPU, a tensor-allocation tracker on CPU."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class MemoryTracker(TorchDispatchMode):
    """Counts live tensor-storage bytes on one device type while active, and their peak.

    Every tensor returned by an op run under the tracker is registered by its storage (views and
    in-place results share one entry; a resized storage is re-counted) and released when the
    storage is freed. Tensors that existed before must be handed to :meth:`track`. Memory a kernel
    allocates internally and frees before returning is not seen, nor are allocator caches.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device_type = torch.device(device).type
        self.current = 0
        self.peak = 0
        self._live: dict[int, list] = {}

    def track(self, tensors) -> None:
        """Count already existing tensors (parameters, optimizer state, ...)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.to_local() if hasattr(t, "to_local") else t)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = id(storage)
        size = storage.nbytes()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [weakref.ref(storage, lambda _, k=key: self._release(k)), size]
            self.current += size
        elif entry[1] != size:
            self.current += size - entry[1]
            entry[1] = size
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


class PeakMemory:
    """Context manager measuring the peak memory of ``device`` while it is open: ``peak_bytes``.

    CUDA: ``torch.cuda.max_memory_allocated`` (all tensors on the device, reset on entry).
    CPU: a :class:`MemoryTracker` seeded with ``tensors`` (what already exists: parameters, buffers,
    gradients, optimizer state).
    """

    def __init__(self, device: torch.device | str, tensors=()):
        self.device = torch.device(device)
        self.tensors = list(tensors)
        self.peak_bytes: int | None = None
        self._tracker: MemoryTracker | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = MemoryTracker(self.device)
            self._tracker.track(self.tensors)
            self._tracker.__enter__()
        self.tensors = []
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._tracker is not None:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self._tracker.peak
            self._tracker = None
