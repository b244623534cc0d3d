"""Checkpoints: exact resume (in-process and after SIGKILL), damaged checkpoints skipped, atomic writes, no pickle."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkern.train import TrainConfig, Trainer
from llmkern.train import checkpoint as ckpt
from llmkern.train.metrics import read_metrics
from tests._train_utils import make_dataset, single_thread, snapshot, tiny_model  # noqa: F401 (single_thread: autouse)

REPO = Path(__file__).resolve().parents[1]
DATA = dict(n=24, seed=4)


def _config(output_dir, **overrides) -> TrainConfig:
    cfg = dict(output_dir=str(output_dir), max_steps=6, micro_batch_size=2, grad_accum_steps=2, lr=1e-2,
               warmup_steps=2, save_every=2, progress=False)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def _run(output_dir, **overrides):
    """Train TinyLM (with dropout, so RNG state matters) and return the model and final metrics."""
    model = tiny_model(dropout=0.1)
    out = Trainer(model, _config(output_dir, **overrides), make_dataset(**DATA)).train()
    return model, out


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max abs diff {(a[name] - b[name]).abs().max():.3g})"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    model, out = _run(out_dir)
    return out_dir, snapshot(model), out


def test_checkpoint_files_are_safetensors_and_json(uninterrupted):
    out_dir, _, _ = uninterrupted
    steps = [s for s, _ in ckpt.list_checkpoints(out_dir)]
    assert steps == [6, 4, 2]
    path = out_dir / "checkpoints" / "step-00000006"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "trainer_state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["max_steps"] == 6
    assert state["scaler"]["enabled"] is False and len(state["rng"]) == 1
    optimizer = load_file(str(path / "optimizer.safetensors"))
    assert {k.rsplit("/", 1)[1] for k in optimizer} == {"exp_avg", "exp_avg_sq", "step"}
    assert "rank0/cpu" in load_file(str(path / "rng.safetensors"))
    assert not list((out_dir / "checkpoints").glob(".tmp-*"))


def test_no_pickle_in_training_code():
    """Checkpoints must not go through pickle: no torch.save/torch.load/pickle in the writer's code."""
    sources = list((REPO / "llmkern" / "train").glob("*.py")) + [REPO / "llmkern" / "qlora.py"]
    for path in sources:
        text = path.read_text()
        for banned in ("torch.save(", "torch.load(", "import pickle", "pickle."):
            assert banned not in text, f"{path.name} uses {banned}"


def test_resume_from_a_middle_checkpoint_is_bit_identical(uninterrupted, tmp_path):
    out_dir, final, out = uninterrupted
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out_dir, resumed_dir)
    for step in (4, 6):
        shutil.rmtree(resumed_dir / "checkpoints" / f"step-{step:08d}")
    model, resumed = _run(resumed_dir, resume=True)
    _assert_identical(snapshot(model), final)
    assert resumed["loss"] == out["loss"]
    assert [r["loss"] for r in read_metrics(resumed_dir / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl")]


def test_resume_without_checkpoint_starts_fresh(uninterrupted, tmp_path, capsys):
    _, final, _ = uninterrupted
    model, _ = _run(tmp_path, resume=True, progress=True)
    assert "no complete checkpoint" in capsys.readouterr().out
    _assert_identical(snapshot(model), final)


def _damage(path: Path, how: str) -> str:
    """Damage a checkpoint directory; returns the text the skip message must contain."""
    if how == "truncated":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return "truncated"
    if how == "bitflip":
        f = path / "optimizer.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
        return "sha256"
    if how == "no_manifest":
        (path / "manifest.json").unlink()
        return "manifest.json is missing"
    if how == "missing_file":
        (path / "rng.safetensors").unlink()
        return "rng.safetensors is missing"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "bitflip", "no_manifest", "missing_file"])
def test_damaged_checkpoint_is_skipped_with_a_message(uninterrupted, tmp_path, caplog, how):
    out_dir, final, _ = uninterrupted
    work = tmp_path / "run"
    shutil.copytree(out_dir, work)
    shutil.rmtree(work / "checkpoints" / "step-00000006")
    expected = _damage(work / "checkpoints" / "step-00000004", how)
    with caplog.at_level(logging.WARNING, logger="llmkern.train"):
        model, _ = _run(work, resume=True)
    assert "skipping checkpoint" in caplog.text and "step-00000004" in caplog.text and expected in caplog.text
    _assert_identical(snapshot(model), final)  # resumed from step 2, so the run is still exact


def test_every_checkpoint_damaged_starts_from_scratch(uninterrupted, tmp_path, caplog):
    out_dir, final, _ = uninterrupted
    work = tmp_path / "run"
    shutil.copytree(out_dir, work)
    for step in (2, 4, 6):
        _damage(work / "checkpoints" / f"step-{step:08d}", "truncated")
    with caplog.at_level(logging.WARNING, logger="llmkern.train"):
        model, _ = _run(work, resume=True)
    assert caplog.text.count("skipping checkpoint") == 3
    _assert_identical(snapshot(model), final)


def test_write_is_atomic(tmp_path, monkeypatch):
    tensors = {"model": {"w": torch.ones(3)}}

    def fail(_path):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 7, tensors, {"trainer_state": {"step": 7}})
    assert ckpt.list_checkpoints(tmp_path) == []
    assert ckpt.latest_checkpoint(tmp_path) is None
    monkeypatch.undo()
    path = ckpt.save_checkpoint(tmp_path, 7, tensors, {"trainer_state": {"step": 7}})
    step, found, loaded, docs = ckpt.latest_checkpoint(tmp_path)
    assert (step, found) == (7, path) and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert docs["trainer_state"] == {"step": 7}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keep_checkpoints(tmp_path):
    _run(tmp_path, max_steps=4, save_every=1, keep_checkpoints=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]


KILLED_RUN = """
import sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from llmkern.train import TrainConfig, Trainer, pad_collate
from tests._train_utils import make_dataset, tiny_model

def slow_collate(items):
    time.sleep(0.3)
    return pad_collate(items)

cfg = TrainConfig({out!r}, max_steps=6, micro_batch_size=2, grad_accum_steps=2, lr=1e-2, warmup_steps=2,
                  save_every=1, progress=False)
Trainer(tiny_model(dropout=0.1), cfg, make_dataset(n=24, seed=4), collate_fn=slow_collate).train()
"""


@pytest.mark.end_to_end
def test_kill_and_resume_is_bit_identical(uninterrupted, tmp_path):
    """SIGKILL a training process after its third checkpoint, resume here: same parameters, bit for bit."""
    _, final, _ = uninterrupted
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(repo=str(REPO), out=str(work))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    try:
        while not (work / "checkpoints" / "step-00000003").exists():
            assert proc.poll() is None, f"the training process ended early: {proc.stdout.read().decode()[-2000:]}"
            assert time.time() < deadline, "no third checkpoint after 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = [s for s, _ in ckpt.list_checkpoints(work)]
    assert 3 <= max(done) < 6, done
    model = tiny_model(dropout=0.1)
    Trainer(model, _config(work, save_every=1, resume=True), make_dataset(**DATA)).train()
    _assert_identical(snapshot(model), final)
    assert os.path.exists(work / "checkpoints" / "step-00000006")
