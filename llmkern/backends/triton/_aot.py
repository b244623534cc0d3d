"""Ahead-of-time compile specs: how each Triton launcher module exposes its default configurations.

Every ``llmkern/backends/triton/<family>.py`` defines ``aot_specs() -> list[AotSpec]`` listing the
configurations it launches by default (and its autotune candidates), so that ``llmkern kernels``
can compile them for sm_80 / sm_90 without a GPU and report registers, spills and shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AotSpec:
    """One kernel configuration to compile ahead of time.

    name: readable id, e.g. ``"norm_fwd[BLOCK_N=4096, fp16]"``.
    fn: the ``@triton.jit`` function.
    signature: every non-constexpr argument, in order -> Triton type (``"*fp16"``, ``"*fp32"``,
        ``"*u8"``, ``"i32"``, ``"i64"``, ``"fp32"``).
    constants: every ``tl.constexpr`` argument -> its value for this configuration.
    autotune: True for an autotune candidate, False (default) for a configuration launched by
        default. ``llmkern kernels`` reports both; the suite requires default ones not to spill.
    """

    name: str
    fn: object
    signature: dict[str, str]
    constants: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    autotune: bool = False
