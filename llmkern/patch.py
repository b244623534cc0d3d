"""``swap_modules``: put llmkern's norms and attention into an existing model (Hugging Face models included).

Norms are recognised generically, not by a per-model table: a module is a candidate when it is a
``torch.nn.LayerNorm``/``RMSNorm`` (or subclass) or its class name ends in ``LayerNorm``/``RMSNorm``
(``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``GemmaRMSNorm``, ``T5LayerNorm``, ...). Plain torch modules
are replaced directly. Any other candidate is *probed*: its forward is run on test inputs and
compared with the four conventions llmkern implements, LayerNorm or RMSNorm scaling by ``w`` or by
``1 + w`` (Gemma, Nemotron's LayerNorm1P), with its own ``eps``. The one that reproduces the module
is used; a module matching none is refused with ``ValueError`` before anything changes.
"""
from __future__ import annotations

import copy
import functools
import inspect
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from llmkern import hf_attention, ops
from llmkern import nn as lnn

_NORM_CLASS_NAME = re.compile(r"(RMS|Layer)Norm$", re.IGNORECASE)
_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
_PROBE_RTOL = 1e-4


class UnitOffsetRMSNorm(lnn.RMSNorm):
    """RMSNorm that scales by ``1 + weight`` (Gemma's convention); ``weight`` stores w, as in the original module.

    ``1 + w`` is formed in float32 (as Gemma does): in bfloat16 it would lose w's low bits.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.normalized_shape, 1.0 + self.weight.float(), self.eps)


class UnitOffsetLayerNorm(lnn.LayerNorm):
    """LayerNorm that scales by ``1 + weight`` (Nemotron's ``LayerNorm1P``); ``weight`` stores w (1 + w in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.normalized_shape, 1.0 + self.weight.float(), self.bias, self.eps)


@dataclass(frozen=True)
class NormSpec:
    """What a norm module computes: ``norm(x) * (offset + weight) + bias`` over ``shape``."""

    rms: bool
    offset: float
    shape: tuple[int, ...]
    eps: float | None

    def describe(self) -> str:
        return f"{'RMSNorm' if self.rms else 'LayerNorm'} scaled by {'1 + w' if self.offset else 'w'}"


def _refusal(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"llmkern.swap_modules: cannot replace {name or '<model>'} ({type(module).__name__}): {why}. "
                      "Pass norms=False to keep the model's own norms.")


def _is_candidate(module: nn.Module) -> bool:
    if isinstance(module, (lnn.LayerNorm, lnn.RMSNorm)):
        return False
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or bool(_NORM_CLASS_NAME.search(type(module).__name__))


def _reference(spec: NormSpec, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The candidate convention in float64."""
    w = None if weight is None else spec.offset + weight.double()
    b = None if bias is None else bias.double()
    if spec.rms:
        eps = torch.finfo(torch.float32).eps if spec.eps is None else spec.eps
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if w is None else y * w
    return F.layer_norm(x, spec.shape, w, b, spec.eps)


def _probe(name: str, module: nn.Module, candidates: list[NormSpec]) -> NormSpec:
    """The candidate that reproduces ``module`` on inputs at scale 1 and 1e-3 (where eps matters), with a mean offset
    (which tells LayerNorm from RMSNorm); computed on a float32 copy of the module."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        raise _refusal(name, module, "its weights are on the meta device, so its behaviour cannot be checked")
    probe = copy.deepcopy(module).to(torch.float32)
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn((2, 3) + candidates[0].shape, generator=generator, dtype=torch.float64) + 0.5) * scale
              for scale in (1.0, 1e-3)]
    errors = {}
    with torch.no_grad():
        try:
            outputs = [probe(x.to(device, torch.float32)).double().cpu() for x in inputs]
        except Exception as exc:  # any failure means "not a plain norm": report it, do not guess
            raise _refusal(name, module, f"running it on a (2, 3, {candidates[0].shape[-1]}) input failed "
                                         f"({type(exc).__name__}: {exc})") from exc
        w = None if weight is None else weight.detach().cpu()
        b = None if bias is None else bias.detach().cpu()
        for spec in candidates:
            err = 0.0
            for x, y in zip(inputs, outputs):
                expected = _reference(spec, x, w, b)
                if y.shape != expected.shape:
                    err = float("inf")
                    break
                err = max(err, float(((y - expected).abs() / (1.0 + expected.abs())).max()))
            if err <= _PROBE_RTOL:
                return spec
            errors[spec.describe()] = err
    tried = ", ".join(f"{k} (max rel err {v:.1e})" for k, v in errors.items())
    raise _refusal(name, module, f"its output matches none of the norms llmkern implements: {tried}")


def norm_spec(name: str, module: nn.Module) -> NormSpec:
    """Recognise what the norm ``module`` computes; ``ValueError`` (naming ``name``) if it is not a plain norm."""
    if type(module) is nn.LayerNorm:
        return NormSpec(False, 0.0, tuple(module.normalized_shape), module.eps)
    if type(module) is nn.RMSNorm:
        return NormSpec(True, 0.0, tuple(module.normalized_shape), module.eps)
    if any(True for _ in module.children()):
        raise _refusal(name, module, "it has submodules, which a plain norm does not")
    params = dict(module.named_parameters(recurse=False))
    extra = sorted(set(params) - {"weight", "bias"})
    if extra:
        raise _refusal(name, module, f"it has parameters {extra} besides weight and bias")
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None:
        raise _refusal(name, module, "it has no weight parameter" + (" but a bias" if bias is not None else ""))
    if weight.dim() != 1 or (bias is not None and bias.shape != weight.shape):
        raise _refusal(name, module, f"expected a 1-D weight (and a bias of the same shape), got weight "
                                     f"{tuple(weight.shape)}" + ("" if bias is None else f", bias {tuple(bias.shape)}"))
    eps = next((v for v in (getattr(module, a, None) for a in _EPS_ATTRIBUTES) if isinstance(v, (int, float))), None)
    if eps is None:
        raise _refusal(name, module, f"it has none of the attributes {_EPS_ATTRIBUTES} giving its epsilon")
    shape = (weight.shape[0],)
    kinds = [False] if bias is not None else [True, False]
    return _probe(name, module, [NormSpec(rms, offset, shape, float(eps)) for rms in kinds for offset in (0.0, 1.0)])


def llmkern_norm(spec: NormSpec, module: nn.Module) -> nn.Module:
    """An llmkern norm computing ``spec``, holding the very same weight/bias Parameters as ``module``."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if spec.rms:
        cls = UnitOffsetRMSNorm if spec.offset else lnn.RMSNorm
        new = cls(spec.shape, eps=spec.eps, elementwise_affine=weight is not None, device="meta")
    else:
        cls = UnitOffsetLayerNorm if spec.offset else lnn.LayerNorm
        new = cls(spec.shape, eps=spec.eps, elementwise_affine=weight is not None, bias=bias is not None, device="meta")
    if weight is not None:
        new.weight = weight
    if bias is not None:
        new.bias = bias
    return new.train(module.training)


def _swap_norms(model: nn.Module) -> list[str]:
    plan: dict[int, nn.Module] = {}
    names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_candidate(module):
            if id(module) not in plan:
                plan[id(module)] = llmkern_norm(norm_spec(name, module), module)
            names.append(name)
    if "" in names:
        raise ValueError(f"llmkern.swap_modules: the model itself is a norm ({type(model).__name__}) and cannot be "
                         "replaced in place; use llmkern.nn.LayerNorm / RMSNorm directly")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, plan[id(parent._modules[child])])
    return names


@functools.lru_cache(maxsize=None)
def _uses_attention_interface(cls: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _switch_hf_attention(model: nn.Module) -> list[str]:
    """Switch every Hugging Face (sub)model to "llmkern" attention; the names of the attention modules switched."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    attention_modules = [(name, module) for name, module in model.named_modules()
                         if not isinstance(module, PreTrainedModel) and getattr(module, "config", None) is not None
                         and _uses_attention_interface(type(module))]
    if not attention_modules:
        return []
    before = {name: getattr(module.config, "_attn_implementation", None) for name, module in attention_modules}
    hf_attention.register()
    configs = set()
    for root in model.modules():
        if isinstance(root, PreTrainedModel) and id(root.config) not in configs:
            configs.add(id(root.config))
            root.set_attn_implementation(hf_attention.NAME)
    now = {name: getattr(module.config, "_attn_implementation", None) for name, module in attention_modules}
    unchanged = [name for name in now if now[name] != hf_attention.NAME]
    if unchanged:
        warnings.warn(f"llmkern.swap_modules: {len(unchanged)} attention modules (e.g. {unchanged[0]}) kept "
                      "their attention implementation: their model cannot switch it at run time",
                      RuntimeWarning, stacklevel=3)
    return [name for name in now if now[name] == hf_attention.NAME != before[name]]


def swap_modules(model: nn.Module, norms: bool = True, attention: bool = True) -> list[str]:
    """Replace, in place, the norms and attention of ``model`` by llmkern's; returns the qualified names replaced.

    norms: every LayerNorm/RMSNorm-like module (see the module docstring for how they are recognised)
        becomes an :class:`llmkern.nn.LayerNorm`/:class:`llmkern.nn.RMSNorm` (or a unit-offset variant)
        that holds the *same* weight/bias Parameters, so optimizers, tied weights and state_dict keys are
        unaffected. An unrecognised norm raises ``ValueError`` before any module is replaced.
    attention: for Hugging Face transformers models, registers the ``"llmkern"`` attention
        implementation (:mod:`llmkern.hf_attention`) and switches the model's config to it; the names
        returned are those of the attention modules that now run llmkern attention. Models whose
        attention cannot be switched keep theirs, with a warning. Other models' attention is left alone.

    Outputs and gradients stay equal to the original model's within the DESIGN.md tolerances.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"llmkern.swap_modules: model must be a torch.nn.Module, got {type(model).__name__}")
    replaced = _swap_norms(model) if norms else []
    if attention:
        replaced += _switch_hf_attention(model)
    return replaced
