"""Shared fixtures: the seed, and the backends a test run covers.

Default run: the ``reference`` and ``cpu`` backends on CPU tensors, plus ``triton`` on CUDA tensors
when a GPU is present. With ``LLMKERN_BACKEND=<name>`` only that backend is tested (CI's second pass
uses ``TRITON_INTERPRET=1 LLMKERN_BACKEND=triton`` to run every Triton kernel in the interpreter).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import llmkern
from llmkern.backends import TRITON_INTERPRET

ENV_BACKEND = os.environ.get("LLMKERN_BACKEND", "auto")
INTERPRETED_PASS = TRITON_INTERPRET and ENV_BACKEND == "triton"


@dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device.type == "cpu"


def _backends() -> list[Backend]:
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    cpu = torch.device("cpu")
    if ENV_BACKEND != "auto":
        if ENV_BACKEND == "triton":
            return [Backend("triton", cuda or cpu)]
        if ENV_BACKEND == "reference":
            return [Backend("reference", cuda or cpu)]
        return [Backend(ENV_BACKEND, cpu)]
    found = [Backend("reference", cpu), Backend("cpu", cpu)]
    if cuda is not None:
        found += [Backend("reference", cuda), Backend("triton", cuda)]
    return found


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS, ids=lambda b: f"{b.name}-{b.device.type}")
def backend(request):
    """The backend under test, active for the whole test: ``backend.name``, ``backend.device``."""
    with llmkern.use_backend(request.param.name):
        yield request.param


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    if not INTERPRETED_PASS:
        return
    skip = pytest.mark.skip(reason="end-to-end test: it runs in the default pass; the Triton interpreter would take hours")
    for item in items:
        if "end_to_end" in item.keywords:
            item.add_marker(skip)
