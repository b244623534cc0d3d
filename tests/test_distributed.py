"""Data parallel training under ``torchrun --nproc_per_node 2`` (gloo, CPU): DDP, ZeRO-1 and FSDP2 match one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmkern.train import TrainConfig, Trainer
from tests._numerics import assert_close
from tests._train_utils import make_dataset, single_thread, snapshot, tiny_model  # noqa: F401 (single_thread: autouse)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.end_to_end


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path_factory.mktemp("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(command + ["--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "_distributed_worker.py"),
                                     str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


def _single_process(tmp_path, **overrides):
    """The same global batches on one process: micro-batch 2 x 2 accumulation steps."""
    model = tiny_model()
    cfg = dict(output_dir=str(tmp_path), max_steps=4, micro_batch_size=2, grad_accum_steps=2, lr=0.2,
               optimizer="sgd", momentum=0.9, weight_decay=0.1, warmup_steps=1, progress=False, report_memory=False)
    cfg.update(overrides)
    result = Trainer(model, TrainConfig(**cfg), make_dataset(24, seed=6)).train()
    return snapshot(model), result["loss"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """``(optimizer, lr) -> (parameters, final loss)`` of the one-process run, computed once each."""
    results = {}

    def run(optimizer: str, lr: float):
        if (optimizer, lr) not in results:
            results[optimizer, lr] = _single_process(tmp_path_factory.mktemp(optimizer), optimizer=optimizer, lr=lr)
        return results[optimizer, lr]

    return run


def _loss(path: Path) -> float:
    with safe_open(str(path), "pt") as f:
        return float(f.metadata()["loss"])


@pytest.mark.parametrize("mode", ["ddp", "zero1", "fsdp"])
def test_two_processes_match_one(torchrun_results, single_process, mode):
    expected, loss = single_process("sgd", 0.2)
    got = load_file(str(torchrun_results / f"{mode}.safetensors"))
    start = snapshot(tiny_model())
    assert all(not torch.equal(expected[n], start[n]) for n in start)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, name=f"{mode} {name}")
    assert _loss(torchrun_results / f"{mode}.safetensors") == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("run", ["zero1_adamw", "fsdp_adamw"])
def test_sharded_adamw_and_its_resume(torchrun_results, single_process, run):
    """ZeRO-1 / FSDP2 with AdamW (sharded moments): the run resumed from its step-2 checkpoint (state
    gathered and written by rank 0, re-sharded on load) ends bit-identical; the loss matches one process."""
    full = load_file(str(torchrun_results / f"{run}.safetensors"))
    resumed = load_file(str(torchrun_results / f"{run}_resumed.safetensors"))
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    _, loss = single_process("adamw", 1e-2)
    assert _loss(torchrun_results / f"{run}.safetensors") == pytest.approx(loss, rel=1e-5)
    checkpoints = sorted(p.name for p in (torchrun_results / run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]
