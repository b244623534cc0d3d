"""Save / load a :class:`~llmkern.models.Transformer` as ``config.json`` + ``model.safetensors`` (no pickle)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from llmkern.models.config import TransformerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "llmkern-transformer"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_pretrained(model, path: str | os.PathLike) -> None:
    """Create ``path`` and write the config and the weights; a tied head is stored once."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, **model.config.to_dict()}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_model(model, str(path / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})


def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild ``cls(config)`` from ``path/config.json`` and load ``path/model.safetensors`` strictly."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"llmkern.models.Transformer.from_pretrained: no {name} in {path}")
    config = json.loads((path / CONFIG_NAME).read_text())
    model_type = config.pop("model_type", None)
    if model_type != MODEL_TYPE:
        raise ValueError(f"llmkern.models.Transformer.from_pretrained: {path / CONFIG_NAME} has model_type "
                         f"{model_type!r}, expected {MODEL_TYPE!r}")
    with torch.device("meta"):
        model = cls(TransformerConfig.from_dict(config))
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        dtype = f.get_slice("embed_tokens.weight").get_dtype()
    model = model.to_empty(device=device).to(_DTYPES[dtype])
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_model(model, str(path / WEIGHTS_NAME), strict=True, device=str(device))
    return model
