"""The trainer's state as checkpoint content (tensor dicts + JSON) and back, on one or many processes.

Parameters and optimizer state are keyed by parameter name (the unwrapped model's
``named_parameters``), so a checkpoint does not depend on DDP/ZeRO/FSDP wrapping. Only trainable
parameters are stored: the frozen ones (a QLoRA base) come from the model given to the trainer.
Collective calls (ZeRO consolidation, FSDP gathers, RNG gathers) run on every process; the
returned content is complete on rank 0.
"""
from __future__ import annotations

import json
import random

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from llmkern.train.distributed import DistContext, all_gather_bytes


def _full_state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_tensors(model: nn.Module, names: list[str], fsdp: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters ``names`` as full CPU tensors (FSDP: gathered, collective)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_state_options())
        return {n: full[n] for n in names if n in full}
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], names: list[str], fsdp: bool) -> None:
    """Copy checkpointed trainable parameters into ``model`` (every process holds the full ``tensors``)."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"llmkern.train: the checkpoint does not match the model: no tensor for trainable "
                         f"parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, {n: tensors[n] for n in names}, options=_full_state_options(strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            if params[n].shape != tensors[n].shape:
                raise ValueError(f"llmkern.train: the checkpoint does not match the model: {n} has shape "
                                 f"{tuple(tensors[n].shape)} in the checkpoint, {tuple(params[n].shape)} in the model")
            params[n].copy_(tensors[n])


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"llmkern.train: cannot store optimizer value of type {type(value).__name__} in JSON")


def optimizer_content(model: nn.Module, optimizer, names: list[str], fsdp: bool, ctx: DistContext
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter name: tensors ``"<name>/<key>"`` and a JSON dict with the
    param groups (parameter names instead of indices) and the non-tensor state values."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
        if not ctx.is_main:  # the full state is gathered on rank 0 only
            return {}, {}
        key_name = {n: n for n in names}
    else:
        if hasattr(optimizer, "consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)
            if not ctx.is_main:
                return {}, {}
        sd = optimizer.state_dict()
        key_name = dict(enumerate(names))
    tensors, scalars = {}, {}
    for key, state in sd["state"].items():
        name = key_name[key]
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = _local(v).detach().cpu()
            else:
                scalars.setdefault(name, {})[k] = _jsonable(v)
    groups = [{**{k: _jsonable(v) for k, v in g.items() if k != "params"}, "params": [key_name[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_content(model: nn.Module, optimizer, names: list[str], fsdp: bool,
                           tensors: dict[str, torch.Tensor], doc: dict) -> None:
    """Inverse of :func:`optimizer_content`; every process passes the full content."""
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = t
    for name, values in doc["scalars"].items():
        state.setdefault(name, {}).update(values)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"llmkern.train: the checkpoint's optimizer state names parameters the model does not "
                         f"train: {unknown[:5]}")
    current = optimizer.param_groups
    if len(current) != len(doc["param_groups"]):
        raise ValueError(f"llmkern.train: the checkpoint has {len(doc['param_groups'])} optimizer param groups, "
                         f"the optimizer {len(current)}")
    groups = []
    for saved, live in zip(doc["param_groups"], current):
        group = {k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()}
        groups.append(group)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=_full_state_options())
        return
    index = {n: i for i, n in enumerate(names)}
    optimizer.load_state_dict({
        "state": {index[n]: s for n, s in state.items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    })


def _local_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    doc = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, doc


def rng_content(ctx: DistContext) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Every process's RNG states (collective): tensors ``"rank<r>/<generator>"`` and JSON docs by rank."""
    tensors, doc = _local_rng()
    blobs = all_gather_bytes(save_safetensors(tensors), ctx)
    docs = all_gather_bytes(json.dumps(doc).encode(), ctx)
    out = {}
    for rank, blob in enumerate(blobs):
        out.update({f"rank{rank}/{k}": v for k, v in load_safetensors(blob).items()})
    return out, [json.loads(d) for d in docs]


def restore_rng(tensors: dict[str, torch.Tensor], docs: list[dict], rank: int) -> None:
    """Restore this process's RNG states from :func:`rng_content`'s output."""
    prefix = f"rank{rank}/"
    torch.set_rng_state(tensors[prefix + "cpu"])
    cuda = sorted(k for k in tensors if k.startswith(prefix + "cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    doc = docs[rank]
    version, internal, gauss = doc["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
