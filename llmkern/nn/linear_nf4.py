"""``LinearNF4``: a frozen 4-bit NF4 linear layer with bitsandbytes ``Linear4bit``'s state_dict."""
from __future__ import annotations

import math

import torch

from llmkern import ops
from llmkern.quant_state import QuantState

_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__")


class LinearNF4(torch.nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored as NF4 (4 bits per weight plus block scales).

    Constructor as ``bitsandbytes.nn.LinearNF4``: ``LinearNF4(input_features, output_features,
    bias=True, compute_dtype=None, compress_statistics=True, blocksize=64, device=None)``; the new
    layer holds the NF4 quantization of an ``nn.Linear``-style random init. Usually built with
    :meth:`from_linear` or filled with :meth:`load_state_dict`.

    Attributes:
        weight: frozen ``nn.Parameter`` of uint8, shape ``((out * in + 1) // 2, 1)``: the packed
            nibbles, layout documented in :mod:`llmkern.quant_state`.
        quant_state: :class:`llmkern.QuantState` of ``weight`` (``shape == (out_features, in_features)``).
        bias: ``nn.Parameter`` (out_features,) or None.
        compute_dtype: dtype the product is computed in (input cast to it, result cast back to the
            input's dtype), or None to compute in the input's dtype.
        in_features, out_features, blocksize, compress_statistics.

    state_dict keys are bitsandbytes ``Linear4bit``'s: ``weight``, ``bias``, ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and
    ``weight.quant_state.bitsandbytes__nf4``; loading checks the state against the weight and
    raises ``ValueError`` naming what is inconsistent. Gradients flow to the input and the bias.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: torch.dtype | None = None, compress_statistics: bool = True, blocksize: int = 64,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = int(input_features)
        self.out_features = int(output_features)
        self.compute_dtype = compute_dtype
        self.compress_statistics = bool(compress_statistics)
        self.blocksize = int(blocksize)
        dense = torch.empty(self.out_features, self.in_features, device=device)
        torch.nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self._set_weight(*ops.nf4_quantize(dense, self.blocksize, self.compress_statistics))
        if bias:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            self.bias = torch.nn.Parameter(torch.empty(self.out_features, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, packed: torch.Tensor, state: QuantState) -> None:
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.quant_state = state

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "LinearNF4":
        """Quantize an ``nn.Linear`` (its weight in its own dtype; the bias is copied, keeping its
        dtype and ``requires_grad``). ``compute_dtype`` None computes in the input's dtype."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"llmkern.nn.LinearNF4.from_linear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.compute_dtype = compute_dtype
        module.compress_statistics = bool(double_quant)
        module.blocksize = int(blocksize)
        module._set_weight(*ops.nf4_quantize(linear.weight.detach(), blocksize, double_quant))
        if linear.bias is not None:
            module.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            module.register_parameter("bias", None)
        return module

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out_features, in_features) in ``dtype`` (default: the quantized weight's dtype)."""
        return ops.nf4_dequantize(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return ops.nf4_linear(x.to(dtype), self.weight, self.quant_state, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.quant_state.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        stem = prefix + "weight."
        state_items = {k[len(stem):]: v for k, v in state_dict.items()
                       if k.startswith(stem) and k[len(stem):].startswith(_STATE_KEYS)}
        weight_key = prefix + "weight"
        if weight_key in state_dict:
            if not state_items:
                raise ValueError(f"llmkern.nn.LinearNF4: {weight_key!r} is in the state_dict but its quant state "
                                 f"('{stem}absmax', '{stem}quant_state.bitsandbytes__nf4', ...) is missing")
            packed = state_dict[weight_key]
            state = QuantState.from_dict(state_items, device=self.weight.device)
            state.validate(packed, where="nn.LinearNF4.load_state_dict", values=True)
            if tuple(state.shape) != (self.out_features, self.in_features):
                raise ValueError(f"llmkern.nn.LinearNF4.load_state_dict: the quant state is for a weight of shape "
                                 f"{tuple(state.shape)}, this layer is ({self.out_features}, {self.in_features})")
            if tuple(packed.shape) != tuple(self.weight.shape):
                self.weight = torch.nn.Parameter(self.weight.new_empty(packed.shape), requires_grad=False)
            self.quant_state = state
            self.blocksize, self.compress_statistics = state.blocksize, state.nested
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in state_items:
            full = stem + key
            if full in unexpected_keys:
                unexpected_keys.remove(full)

    def extra_repr(self) -> str:
        stats = "double_quant" if self.quant_state.nested else "float32 absmax"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.quant_state.blocksize}, {stats}, "
                f"compute_dtype={str(self.compute_dtype).replace('torch.', '') if self.compute_dtype else 'input'}")
