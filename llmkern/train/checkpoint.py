"""Checkpoint files: tensors in safetensors, everything else in JSON, written atomically, verified on load.

Layout of ``<output_dir>/checkpoints/step-00000042/``::

    model.safetensors       trainable parameters by name
    optimizer.safetensors   optimizer tensors, keys "<param name>/<state key>"
    rng.safetensors         torch RNG states per process, keys "rank<r>/cpu", "rank<r>/cuda<i>"
    trainer_state.json      step, data position, optimizer hyper-parameters and scalars, loss scale,
                            Python/NumPy RNG states, the TrainConfig, the last metrics
    manifest.json           written last: every file's size and sha256

A checkpoint is written into a ``.tmp-step-...`` directory, flushed to disk, then renamed into place,
so a crash leaves either no checkpoint or a complete one. :func:`latest_checkpoint` checks the
manifest (sizes and hashes) and parses every file before trusting a checkpoint; a damaged one is
skipped with a warning naming the reason, and the next older one is tried.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger("llmkern.train")

FORMAT = "llmkern.train.checkpoint/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint directory is incomplete or damaged."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(output_dir: str | os.PathLike, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    documents: dict[str, dict], keep: int = 0) -> Path:
    """Write checkpoint ``step`` atomically and return its directory.

    Args:
        tensors: file stem -> {key: tensor}, each written as ``<stem>.safetensors``.
        documents: file stem -> JSON-serialisable dict, each written as ``<stem>.json``.
        keep: afterwards delete all but the newest ``keep`` checkpoints (0 keeps all).
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for stem, content in tensors.items():
        path = tmp / f"{stem}.safetensors"
        save_file(_contiguous(content), str(path))
        files[path.name] = path
    for stem, content in documents.items():
        path = tmp / f"{stem}.json"
        path.write_text(json.dumps(content, indent=1, sort_keys=True, allow_nan=True))
        files[path.name] = path
    manifest = {"format": FORMAT, "step": step,
                "files": {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in sorted(files.items())}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    if final.exists():
        old = root / f".old-step-{step:08d}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    if keep:
        for _, path in list_checkpoints(output_dir)[keep:]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every finished checkpoint directory, newest first (not yet verified)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """Verify and read a checkpoint directory: ``(tensors by file stem, documents by file stem)``.

    Raises :class:`CheckpointError` naming the problem: missing manifest or file, size or sha256
    mismatch, unreadable safetensors or JSON.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST} is missing (the checkpoint was not finished)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{MANIFEST} is not a {FORMAT} manifest")
    tensors, documents = {}, {}
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 in the manifest (corrupted)")
        stem, suffix = name.rsplit(".", 1)
        try:
            if suffix == "safetensors":
                tensors[stem] = load_file(str(file))
            else:
                documents[stem] = json.loads(file.read_text())
        except Exception as exc:
            raise CheckpointError(f"{name} cannot be read ({type(exc).__name__}: {exc})") from None
    return tensors, documents


def latest_checkpoint(output_dir: str | os.PathLike):
    """The newest checkpoint that verifies: ``(step, path, tensors, documents)``, or ``None``.

    Every damaged checkpoint met on the way is skipped with a warning on the ``llmkern.train`` logger.
    """
    for step, path in list_checkpoints(output_dir):
        try:
            tensors, documents = load_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("llmkern.train: skipping checkpoint %s: %s", path, exc)
            continue
        return step, path, tensors, documents
    return None
