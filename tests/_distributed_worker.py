"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: trains TinyLM with DDP, ZeRO-1 and
FSDP2 (gloo, CPU) and has rank 0 write the final parameters to ``<out>/<run>.safetensors``; then resumes
the AdamW runs of ZeRO-1 and FSDP2 from their step-2 checkpoints (``<run>_resumed.safetensors``)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmkern.train import TrainConfig, Trainer  # noqa: E402
from tests._train_utils import make_dataset, tiny_model  # noqa: E402


def config(out: Path, **overrides) -> TrainConfig:
    """World 2 x micro-batch 2 x no accumulation = the single-process 2 x 2 global batch of 4."""
    cfg = dict(output_dir=str(out), max_steps=4, micro_batch_size=2, grad_accum_steps=1, lr=0.2, optimizer="sgd",
               momentum=0.9, weight_decay=0.1, warmup_steps=1, save_every=2, progress=False, report_memory=False)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for n, p in model.named_parameters()}


def run(out: Path, name: str, **overrides) -> None:
    model = tiny_model()
    result = Trainer(model, config(out / name, **overrides), make_dataset(24, seed=6)).train()
    params = full_params(model)
    if dist.get_rank() == 0:
        save_file(params, str(out / f"{name}.safetensors"), metadata={"loss": repr(result["loss"])})


def main() -> None:
    out = Path(sys.argv[1])
    run(out, "ddp")
    run(out, "zero1", zero=1)
    run(out, "fsdp", fsdp=True)
    for name, sharding in (("zero1_adamw", {"zero": 1}), ("fsdp_adamw", {"fsdp": True})):
        run(out, name, optimizer="adamw", lr=1e-2, **sharding)
        if dist.get_rank() == 0:
            shutil.copytree(out / name, out / f"{name}_resumed")
            shutil.rmtree(out / f"{name}_resumed" / "checkpoints" / "step-00000004")
        dist.barrier()
        run(out, f"{name}_resumed", optimizer="adamw", lr=1e-2, resume=True, **sharding)
    dist.barrier()
    dist.destroy_process_group()
    # Every result is on disk. Skip the interpreter's teardown: with torch 2.13 and gloo about one
    # run in ten aborted there ("terminate called without an active exception", or SIGSEGV), after
    # all the work was done, in torch's own threads racing static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
