"""Shared pytest-benchmark setup for bench/: machine stamps, peak memory, throughput, ``--quick``.

Conventions every ``bench/bench_<family>.py`` follows (``llmkern bench`` relies on them):

* the implementation is a parameter named ``provider``; llmkern's own value is ``"llmkern"``, every
  other value (``"torch"``, ``"torch.compile"``, ``"reference"``, ``"bitsandbytes"``, ...) is a peer
  that ``llmkern bench`` compares against, case by case (all other parameters equal);
* throughput goes into ``benchmark.extra_info`` as ``"GB/s"`` or ``"TFLOP/s"`` and peak memory as
  ``"peak_memory_MB"`` (the fixtures below do both);
* GPU-only cases call ``pytest.skip`` with the reason.

Every benchmark's ``extra_info`` gets ``machine`` and ``date`` (UTC) automatically, and the JSON's
``machine_info`` the device, torch/Triton versions and whether Triton runs interpreted.

``--quick`` runs, for each benchmark function, every provider and every ``mode`` of one case: the
parametrizations marked ``@pytest.mark.quick`` if there are any, else the last-listed case in which
at least two providers run on this machine (the largest sizes, when sizes are listed small to large;
a case that skips here, e.g. a GPU-only size on a CPU or a peer that is not installed, gives way to
the one listed before it).
"""
from __future__ import annotations

import datetime
import re

import pytest
import torch

from llmkern.tools.machine import device_name, machine

QUICK_KEEP_ALL = ("provider", "mode")


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="llmkern: one representative case per benchmark (every provider and mode)")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the representative case(s) that --quick runs")


def _case(item) -> tuple:
    """The case an item measures: its parameters other than provider and mode."""
    params = getattr(item, "callspec", None)
    if params is None:
        return ()
    return tuple(sorted((k, repr(v)) for k, v in params.params.items() if k not in QUICK_KEEP_ALL))


def _function(item):
    return getattr(item, "function", item.nodeid)


def pytest_collection_modifyitems(config, items):
    """Under --quick: keep the marked cases where a benchmark has some; else order each benchmark's
    cases last-listed first, so that :func:`pytest_runtest_setup` stops after the first that runs here."""
    if not config.getoption("--quick"):
        return
    groups: dict[object, list] = {}
    for item in items:
        groups.setdefault(_function(item), []).append(item)
    keep, deselected = [], []
    for group in groups.values():
        marked = [item for item in group if item.get_closest_marker("quick")]
        if marked:
            keep += marked
            deselected += [item for item in group if not item.get_closest_marker("quick")]
            continue
        order = list(dict.fromkeys(_case(item) for item in group))[::-1]
        keep += sorted(group, key=lambda item: order.index(_case(item)))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = keep


# (benchmark function, case) -> the providers whose benchmark passed, under --quick.
_QUICK_PASSED: dict[tuple, set] = {}


def _provider(item) -> str:
    params = getattr(item, "callspec", None)
    return str(params.params["provider"]) if params is not None and "provider" in params.params else item.nodeid


def pytest_runtest_setup(item):
    """Under --quick: once a case of a benchmark ran with two providers or more (llmkern and a peer),
    skip the benchmark's other cases."""
    if not item.config.getoption("--quick") or item.get_closest_marker("quick"):
        return
    function, case = _function(item), _case(item)
    if any(f == function and c != case and len(passed) >= 2 for (f, c), passed in _QUICK_PASSED.items()):
        pytest.skip("--quick: another case of this benchmark ran")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.config.getoption("--quick") and report.when == "call" and report.passed:
        _QUICK_PASSED.setdefault((_function(item), _case(item)), set()).add(_provider(item))


def pytest_benchmark_update_machine_info(config, machine_info):
    info = machine()
    del info["date"]  # pytest-benchmark records its own datetime
    machine_info.update(info)


@pytest.fixture(autouse=True)
def _stamp_machine(request):
    """Put the machine's name and the date into every benchmark's extra_info."""
    if "benchmark" in request.fixturenames:
        bench = request.getfixturevalue("benchmark")
        bench.extra_info.setdefault("machine", device_name())
        bench.extra_info.setdefault("date", _today())
    yield


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure_peak_memory(fn, device: torch.device | str) -> int | None:
    """Peak memory (bytes) that one call of ``fn()`` allocates beyond what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, torch's allocator). CPU: growth of the
    process' resident set high-water mark (Linux only; None elsewhere) — large tensors are mapped
    and unmapped per allocation, so this tracks them, but memory reused from the allocator's free
    lists does not show.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _rss("VmHWM") - base)


@pytest.fixture
def peak_memory(benchmark):
    """``peak_memory(fn, device)``: run ``fn`` once, store its peak extra memory as
    ``extra_info["peak_memory_MB"]`` and return it in bytes (None where it cannot be measured)."""

    def measure(fn, device):
        peak = measure_peak_memory(fn, device)
        if peak is not None:
            benchmark.extra_info["peak_memory_MB"] = peak / 2**20
        return peak

    return measure


@pytest.fixture
def throughput(benchmark):
    """``throughput(bytes=..., flops=...)`` after the benchmark ran: stores ``GB/s`` / ``TFLOP/s``
    computed over the median time."""

    def record(bytes: float | None = None, flops: float | None = None):
        median = benchmark.stats.stats.median
        if bytes is not None:
            benchmark.extra_info["GB/s"] = bytes / median / 1e9
        if flops is not None:
            benchmark.extra_info["TFLOP/s"] = flops / median / 1e12

    return record


@pytest.fixture
def synchronized():
    """``synchronized(fn)``: ``fn`` followed by ``torch.cuda.synchronize()`` on a GPU, so wall-clock
    timing covers the kernels and not only their launch."""

    def wrap(fn):
        if not torch.cuda.is_available():
            return fn

        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            return out

        return call

    return wrap
