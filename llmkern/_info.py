"""``llmkern.info()``: what this installation runs on and which backend each op resolves to."""
from __future__ import annotations

import importlib.metadata
import platform
import warnings

import torch

from llmkern import backends


def _version(distribution: str) -> str | None:
    """Installed version of a distribution, read from its metadata (importing it would take seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Versions, device, requested backend, the backend each registered op resolves to per device,
    the C++ extensions' build state, and whether Triton runs interpreted.

    Resolving an op for CPU under ``auto`` builds its C++ extension if needed (about a minute, once).
    """
    from llmkern.backends.cpu import extension_status

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    resolved = {}
    for op in backends.registered_ops():
        row = {}
        for device in devices:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    row[device.type] = backends.resolve(op, device)
                except RuntimeError as exc:
                    row[device.type] = f"unavailable: {exc}"
        resolved[op] = row
    return {
        "llmkern": __import__("llmkern").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "backend": backends.current_backend(),
        "triton_interpreted": backends.TRITON_INTERPRET,
        "strict": backends.strict(),
        "ops": resolved,
        "cpu_extensions": extension_status(),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the dict as JSON")


def run(args) -> int:
    import json

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key == "ops":
            print("ops (backend per device):")
            for op, row in value.items():
                print(f"  {op:24s} " + "  ".join(f"{dev}: {b}" for dev, b in row.items()))
        else:
            print(f"{key:20s} {value}")
    return 0
