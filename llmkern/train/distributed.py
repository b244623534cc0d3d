"""Data-parallel setup under ``torchrun``: process group, model wrapping, collectives the trainer needs.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op on one process.
Under ``torchrun`` the process group uses NCCL with CUDA and Gloo without; the model is wrapped in
``DistributedDataParallel`` (default, also with ``zero=1``) or sharded with FSDP2 ``fully_shard``
(``fsdp=True``: each block, then the root).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(model: nn.Module) -> DistContext:
    """Join the ``torchrun`` process group if there is one (initialising it if needed).

    Device: ``cuda:<LOCAL_RANK>`` when CUDA is available and the run is distributed; otherwise the
    device of the model's first parameter (so a single-process run stays where the user put it).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        first = next(model.parameters(), None)
        return DistContext(0, 1, 0, first.device if first is not None else torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the children of the largest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(model: nn.Module, ctx: DistContext, fsdp: bool) -> nn.Module:
    """The module the trainer calls: ``model`` itself on one process, else DDP or FSDP2 over it.

    FSDP2 shards ``model`` in place (its parameters become DTensors) and returns it.
    """
    if not ctx.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce unless ``enabled``
    (the last micro-batch of an accumulated step)."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum float64 scalars over all processes (identity on one process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_int(value: int, ctx: DistContext) -> int:
    """Rank 0's ``value`` on every process."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def all_gather_bytes(data: bytes, ctx: DistContext) -> list[bytes]:
    """Every process's ``data``, by rank."""
    if not ctx.distributed:
        return [data]
    size = torch.tensor([len(data)], dtype=torch.int64, device=ctx.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=ctx.device)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
    bufs = [torch.zeros_like(buf) for _ in range(ctx.world_size)]
    dist.all_gather(bufs, buf)
    return [b[:int(s.item())].cpu().numpy().tobytes() for b, s in zip(bufs, sizes)]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
