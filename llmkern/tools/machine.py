"""Where and when a measurement was made: every table and JSON the tools write carries this."""
from __future__ import annotations

import datetime
import os
import platform
import re

import torch


def device_name() -> str:
    """The GPU's name, or the CPU's model with its core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
        if found:
            name = found.group(1).strip()
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def machine() -> dict:
    """Device, platform, versions, whether Triton is interpreted, and the UTC date and time."""
    import llmkern
    from llmkern.backends import TRITON_INTERPRET

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "llmkern": llmkern.__version__,
        "triton_interpreted": TRITON_INTERPRET,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
