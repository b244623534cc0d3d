"""QLoRA preparation: NF4 base weights, LoRA adapters, frozen everything else; adapters in PEFT's format.

``prepare_model`` turns the chosen ``nn.Linear`` layers of a model (llmkern ``Transformer`` or a
Hugging Face causal LM) into :class:`llmkern.nn.LoRALinear` over a :class:`llmkern.nn.LinearNF4`
base (or over the dense layer with ``quantize=False``), freezes every other parameter, keeps norms
and adapters in fp32, and turns on gradient checkpointing with input gradients flowing.

``save_adapter`` writes what ``peft.PeftModel.save_pretrained`` writes for a LoRA adapter:
``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight``; ``peft.PeftModel.from_pretrained``
loads it onto the same (unprepared) base model. ``load_adapter`` reads such a directory (written by
llmkern or by PEFT) into a model.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from llmkern.nn import LinearNF4, LoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------ gradient checkpointing
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing (non-reentrant) for an llmkern ``Transformer`` (attribute
    ``gradient_checkpointing``) or a Hugging Face model; anything else raises ``ValueError``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
    else:
        raise ValueError(f"llmkern.qlora: gradient checkpointing needs a model with a `gradient_checkpointing` "
                         f"attribute (llmkern Transformer) or `gradient_checkpointing_enable()` (Hugging Face), "
                         f"got {type(model).__name__}")


def _make_inputs_require_grad(_module, _inputs, output):
    return output.requires_grad_(True) if torch.is_grad_enabled() else output


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so a reentrant checkpoint over frozen embeddings
    still back-propagates into the adapters inside it (PEFT/HF ``enable_input_require_grads``)."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else getattr(model, "embed_tokens", None)
    if isinstance(embedding, nn.Module) and not getattr(model, "_llmkern_input_grads", False):
        embedding.register_forward_hook(_make_inputs_require_grad)
        model._llmkern_input_grads = True


# ------------------------------------------------------------------------------ target selection
def is_norm(module: nn.Module) -> bool:
    """A LayerNorm/RMSNorm: torch's, llmkern's, or any class named ``*LayerNorm`` / ``*RMSNorm`` (Hugging Face)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _output_head(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        if head is not None:
            return head
    return getattr(model, "lm_head", None)


def _matches(name: str, target_modules) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name equal
    to an entry or ending in ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _targets(model: nn.Module, target_modules) -> list[str]:
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"llmkern.qlora.prepare_model: target_modules must be 'all-linear', a regex string or a "
                            f"non-empty list of module names, got {target_modules!r}")
    elif not isinstance(target_modules, str):
        raise TypeError(f"llmkern.qlora.prepare_model: target_modules must be 'all-linear', a regex string or a list "
                        f"of module names, got {type(target_modules).__name__}")
    head = _output_head(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if target_modules == "all-linear" or _matches(name, target_modules):
            names.append(name)
    if not names:
        raise ValueError(f"llmkern.qlora.prepare_model: target_modules={target_modules!r} matches no nn.Linear "
                         f"layer of {type(model).__name__} (the output head is never targeted)")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's :class:`~llmkern.nn.LoRALinear` layers by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ------------------------------------------------------------------------------ prepare
def _add_adapters(model: nn.Module, names: list[str], ranks: dict[str, int], alphas: dict[str, float],
                  lora_dropout: float, quantize: bool, blocksize: int, double_quant: bool,
                  compute_dtype: torch.dtype | None) -> None:
    for name in names:
        linear = model.get_submodule(name)
        base = (LinearNF4.from_linear(linear, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
                if quantize else linear)
        layer = LoRALinear(base, r=ranks[name], lora_alpha=alphas[name], lora_dropout=lora_dropout)
        layer.lora_A.float()
        layer.lora_B.float()
        _replace(model, name, layer)


def prepare_model(model: nn.Module, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                  target_modules="all-linear", quantize: bool = True, blocksize: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype | None = None, gradient_checkpointing: bool = True) -> nn.Module:
    """Prepare ``model`` in place for (Q)LoRA fine-tuning and return it.

    Args:
        model: an llmkern ``Transformer``, a Hugging Face causal LM, or any module with ``nn.Linear`` layers.
        r, lora_alpha, lora_dropout: the adapters (``scaling = lora_alpha / r``), as PEFT's ``LoraConfig``.
        target_modules: "all-linear" (every ``nn.Linear`` but the output head, as PEFT), a list of
            module names (a layer matches when its qualified name equals an entry or ends in
            ``"." + entry``, e.g. ``["q_proj", "v_proj"]``), or a regex matched against the whole name.
        quantize: replace each targeted layer's weight by NF4 (``LinearNF4.from_linear`` with
            ``blocksize``, ``double_quant``, ``compute_dtype``); ``False`` keeps it dense (plain LoRA).
        gradient_checkpointing: turn on the model's activation checkpointing and make the input
            embeddings' output require grad (so adapters inside checkpointed blocks get gradients
            with reentrant checkpointing too).

    Afterwards only the ``lora_A``/``lora_B`` weights (fp32) train; norm weights in fp16/bf16 are
    cast to fp32 (as PEFT's ``prepare_model_for_kbit_training``); everything else is frozen in its dtype.
    """
    if lora_layers(model):
        raise ValueError("llmkern.qlora.prepare_model: the model already has LoRA layers (prepared twice?)")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"llmkern.qlora.prepare_model: r must be an int >= 1, got {r!r}")
    names = _targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if is_norm(module):
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
    _add_adapters(model, names, dict.fromkeys(names, r), dict.fromkeys(names, lora_alpha), lora_dropout,
                  quantize, blocksize, double_quant, compute_dtype)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
        enable_input_require_grads(model)
    return model


# ------------------------------------------------------------------------------ merge / report
def merge(model: nn.Module) -> int:
    """Fold every adapter into its base layer (:meth:`LoRALinear.merge`); returns how many."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge(model: nn.Module) -> int:
    """Undo :func:`merge` on every adapter; returns how many."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; an NF4 weight counts the weights it stores (2 per byte)."""
    trainable = total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            n = p.numel() * 2 if isinstance(module, LinearNF4) and name == "weight" else p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print ``trainable params: ... || all params: ... || trainable%: ...`` (PEFT's line) and return the counts."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


# ------------------------------------------------------------------------------ PEFT files
def _target_spec(model: nn.Module, names: list[str]):
    """The shortest ``target_modules`` selecting exactly ``names``: their last components when those
    select nothing else, else an exact regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))
                and not n.endswith((".base_layer", ".lora_A", ".lora_B")) and _matches(n, leaves)}
    if selected == set(names):
        return leaves
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters as a PEFT LoRA adapter directory and return its path.

    Files: ``adapter_config.json`` (``peft_type`` "LORA", ``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``, per-layer ``rank_pattern``/``alpha_pattern`` where layers differ) and
    ``adapter_model.safetensors`` (``base_model.model.<name>.lora_A.weight`` (r, in) and
    ``.lora_B.weight`` (out, r), in the adapters' dtype).
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"llmkern.qlora.save_adapter: {type(model).__name__} has no LoRA layers; call prepare_model first")
    names = sorted(layers)
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    dropouts = {m.lora_dropout for m in layers.values()}
    if len(dropouts) > 1:
        raise ValueError(f"llmkern.qlora.save_adapter: PEFT stores one lora_dropout, the layers have {sorted(dropouts)}")
    hf_config = getattr(model, "config", None)
    is_hf = hasattr(model, "get_output_embeddings") and hasattr(hf_config, "to_dict")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_hf else None,
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "target_modules": _target_spec(model, names),
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    tensors = {}
    for n in names:
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = layers[n].lora_A.weight.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = layers[n].lora_B.weight.detach().cpu().contiguous()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def _pattern_value(name: str, pattern: dict, default):
    """PEFT's per-layer override: the first key matching the end of ``name`` as a regex."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model: nn.Module, path: str | os.PathLike, quantize: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` and return it.

    A model prepared by :func:`prepare_model` must have the adapter's layers with the same rank and
    alpha. A model without LoRA layers gets them first, on the layers the adapter's
    ``target_modules`` select, over their dense weights (``quantize=True``: over NF4 weights), with
    everything but the adapters frozen. Adapters PEFT cannot express as plain LoRA (DoRA, rsLoRA,
    trained biases, ``modules_to_save``) raise ``ValueError``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise ValueError(f"llmkern.qlora.load_adapter: {path / ADAPTER_CONFIG} does not exist") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"llmkern.qlora.load_adapter: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise ValueError(f"llmkern.qlora.load_adapter: {key}={config[key]!r} is not supported (expected {ok!r})")
    if config.get("modules_to_save"):
        raise ValueError(f"llmkern.qlora.load_adapter: modules_to_save={config['modules_to_save']!r} is not supported")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    r, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    names = sorted({k[len(_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(_PREFIX)})
    if not names:
        raise ValueError(f"llmkern.qlora.load_adapter: {path / ADAPTER_WEIGHTS} holds no '{_PREFIX}*.lora_A.weight' tensors")
    layers = lora_layers(model)
    if not layers:
        missing = [n for n in names if not isinstance(_get(model, n), nn.Linear)]
        if missing:
            raise ValueError(f"llmkern.qlora.load_adapter: the adapter has layers the model lacks or that are not "
                             f"nn.Linear: {missing[:5]}")
        for p in model.parameters():
            p.requires_grad_(False)
        _add_adapters(model, names, {n: _pattern_value(n, rank_pattern, r) for n in names},
                      {n: _pattern_value(n, alpha_pattern, alpha) for n in names}, config.get("lora_dropout", 0.0),
                      quantize, 64, True, None)
        layers = lora_layers(model)
    if set(layers) != set(names):
        raise ValueError(f"llmkern.qlora.load_adapter: the adapter's layers {sorted(set(names) - set(layers))[:5]} are "
                         f"missing from the model, the model's {sorted(set(layers) - set(names))[:5]} from the adapter")
    with torch.no_grad():
        for n in names:
            layer = layers[n]
            want_r, want_alpha = _pattern_value(n, rank_pattern, r), _pattern_value(n, alpha_pattern, alpha)
            if (layer.r, layer.lora_alpha) != (want_r, want_alpha):
                raise ValueError(f"llmkern.qlora.load_adapter: {n} has r={layer.r}, lora_alpha={layer.lora_alpha}; "
                                 f"the adapter r={want_r}, lora_alpha={want_alpha}")
            for part in ("lora_A", "lora_B"):
                key = f"{_PREFIX}{n}.{part}.weight"
                if key not in tensors:
                    raise ValueError(f"llmkern.qlora.load_adapter: {key} is missing from {path / ADAPTER_WEIGHTS}")
                target = getattr(layer, part).weight
                if tuple(tensors[key].shape) != tuple(target.shape):
                    raise ValueError(f"llmkern.qlora.load_adapter: {key} has shape {tuple(tensors[key].shape)}, "
                                     f"the model's {tuple(target.shape)}")
                target.copy_(tensors[key])
    return model


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
