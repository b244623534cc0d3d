"""Launch helpers shared by the Triton row kernels (norms, softmax-like ops, anything holding a row in registers).

:func:`row_config` is the one place that turns a row length into block sizes and a warp count:
``BLOCK_N`` is the next power of two of the row length (rows longer than :data:`MAX_ROW` are
refused with a ``ValueError`` naming the op), several short rows share a program so that each tile
holds about :data:`TILE_ELEMENTS` values, rows wider than a kernel's register budget are cut into
column chunks, and the warp count grows with the tile.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton

from llmkern.backends import TRITON_INTERPRET

MAX_ROW = 65536

# Values per (BLOCK_M, BLOCK_N) tile. On a GPU 4096 fp32 values per tile leave registers for the few
# row tensors a kernel keeps live; in the interpreter every program costs Python overhead, so tiles are larger.
GPU_TILE_ELEMENTS = 4096
TILE_ELEMENTS = 65536 if TRITON_INTERPRET else GPU_TILE_ELEMENTS


@dataclass(frozen=True)
class RowConfig:
    """Block sizes for a kernel whose program handles a ``(block_m, block_n)`` tile of rows.

    block_m: rows per tile (power of two, 1 for long rows).
    block_n: columns per tile: the next power of two of the row length, or the chunk width when the
        row is processed in chunks.
    num_warps: warps per program, by tile size.
    chunks: column chunks per row; 1 when the whole row fits in one tile.
    """

    block_m: int
    block_n: int
    num_warps: int
    chunks: int = 1


def num_warps_for(elements: int) -> int:
    """Warps for a program holding ``elements`` fp32 values per live tensor: 4-16 values per thread up to 32 warps."""
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    return max(1, min(8, elements // 256))


def row_config(op: str, n: int, m: int = 1, tile: int | None = None, max_block: int | None = None) -> RowConfig:
    """Block sizes for ``m`` rows of ``n`` elements.

    Raises ``ValueError`` (naming ``op``) when ``n`` is not in ``[1, MAX_ROW]``. ``m`` caps the rows per
    tile (a tile never exceeds the rows there are); ``tile`` overrides :data:`TILE_ELEMENTS` (ahead-of-time
    specs ask for the GPU's). With ``max_block``, a row whose block would be wider is split into
    ``chunks`` column blocks of ``max_block`` (one row per tile), for kernels that loop over a row
    rather than hold it in registers.
    """
    tile = TILE_ELEMENTS if tile is None else tile
    if not 1 <= n <= MAX_ROW:
        raise ValueError(f"llmkern.{op}: the row length (hidden size) must be in [1, {MAX_ROW}], got {n}")
    block_n = triton.next_power_of_2(n)
    if max_block is not None and block_n > max_block:
        chunks = triton.cdiv(n, max_block)
        return RowConfig(block_m=1, block_n=max_block, num_warps=num_warps_for(max_block), chunks=chunks)
    block_m = max(1, min(tile // block_n, triton.next_power_of_2(max(m, 1))))
    return RowConfig(block_m=block_m, block_n=block_n, num_warps=num_warps_for(block_m * block_n))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, tiles: int, per_sm: int = 2) -> int:
    """Programs for a persistent kernel that loops over ``tiles`` tiles: ``per_sm`` per SM on a GPU
    (4 in the interpreter), never more than there are tiles."""
    if device.type == "cuda":
        cap = per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = 4
    return max(1, min(tiles, cap))


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current while launching (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def lastdim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its last dim has stride 1, else a contiguous copy (kernels take row strides only)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()
