"""``LoRALinear``: a LoRA adapter over a frozen ``nn.Linear`` or ``LinearNF4`` (QLoRA), PEFT-compatible."""
from __future__ import annotations

import math

import torch

from llmkern import ops
from llmkern.nn.linear_nf4 import LinearNF4


class LoRALinear(torch.nn.Module):
    """``y = base(x) + (lora_alpha / r) * lora_B(lora_A(dropout(x)))`` in one fused op (:func:`llmkern.ops.lora_linear`).

    base: the frozen layer, ``torch.nn.Linear`` or :class:`llmkern.nn.LinearNF4`; kept as ``base_layer``
        and frozen here (``requires_grad=False`` on its weight and bias, as PEFT's default ``bias="none"``).
    r: rank (>= 1); lora_alpha: scale numerator, ``scaling = lora_alpha / r``; lora_dropout: dropout
        probability on the LoRA branch's input, in training mode only.

    Parameters and state_dict keys are PEFT's ``lora.Linear`` without the adapter name:
    ``base_layer.weight``, ``base_layer.bias`` (and for an NF4 base bitsandbytes' ``base_layer.weight.absmax``
    etc.), ``lora_A.weight`` (r, in_features), ``lora_B.weight`` (out_features, r). PEFT's saved adapter
    files (``adapter_model.safetensors``) use exactly these ``lora_A.weight`` / ``lora_B.weight`` names;
    its in-memory model inserts the adapter name (``lora_A.default.weight``). Init as PEFT:
    ``lora_A`` Kaiming-uniform with ``a = sqrt(5)``, ``lora_B`` zeros (the adapter starts as the identity
    update). The adapter is created in the compute dtype (the base weight's dtype; an NF4 base's
    ``compute_dtype``, else the dtype it was quantized from) on the base's device.

    Compute: the input is cast to the compute dtype and the result back to the input's dtype;
    adapter weights in another dtype (e.g. fp32 adapters on a bf16 base) are cast per call.

    :meth:`merge` folds the update into the base weight; :meth:`unmerge` takes it out again. For an
    ``nn.Linear`` base they add / subtract ``scaling * B @ A`` (computed in fp32) to W in place, as PEFT
    does, so unmerge restores W up to rounding in W's dtype. For an NF4 base, merge does **not**
    re-quantize: ``base_layer`` becomes a dense ``nn.Linear`` in the compute dtype holding
    ``dequant(W) + scaling * B @ A`` (and the bias), and the NF4 layer is kept aside untouched, so
    unmerge puts back exactly the original 4-bit weight. While merged, forward is the base layer alone.
    """

    def __init__(self, base: torch.nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0):
        super().__init__()
        name = "llmkern.nn.LoRALinear"
        if not isinstance(base, (torch.nn.Linear, LinearNF4)):
            raise TypeError(f"{name}: base must be a torch.nn.Linear or llmkern.nn.LinearNF4, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{name}: r must be an int >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{name}: lora_dropout must be in [0, 1), got {lora_dropout!r}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.scaling = lora_alpha / r
        self.merged = False
        self.__dict__["_nf4_base"] = None  # the NF4 layer while merged (not a submodule: no state_dict keys)
        device = base.weight.device
        dtype = self._compute_dtype(None)
        self.lora_A = torch.nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = torch.nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5)), B zeros."""
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)

    def _compute_dtype(self, x: torch.Tensor | None) -> torch.dtype:
        base = self.base_layer
        if isinstance(base, LinearNF4):
            if base.compute_dtype is not None:
                return base.compute_dtype
            return x.dtype if x is not None else base.quant_state.dtype
        return base.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        dtype = self._compute_dtype(x)
        weight = (base.weight, base.quant_state) if isinstance(base, LinearNF4) else base.weight
        bias = None if base.bias is None else base.bias.to(dtype)
        p = self.lora_dropout if self.training else 0.0
        y = ops.lora_linear(x.to(dtype), weight, self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype),
                            self.scaling, bias, p)
        return y.to(x.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, (out_features, in_features) float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * B @ A`` into the base weight (see the class docstring; NF4: no re-quantization)."""
        if self.merged:
            return
        base = self.base_layer
        if isinstance(base, LinearNF4):
            dtype = self._compute_dtype(None)
            dense = torch.nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                                    device=base.weight.device, dtype=dtype)
            dense.weight.copy_(base.dequantize(torch.float32) + self.delta_weight())
            if base.bias is not None:
                dense.bias.copy_(base.bias)
            dense.requires_grad_(False)
            self.__dict__["_nf4_base"] = base
            self.base_layer = dense
        else:
            base.weight.copy_(base.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: subtract the update from a dense W, or restore the original NF4 layer."""
        if not self.merged:
            return
        nf4 = self.__dict__["_nf4_base"]
        if nf4 is not None:
            self.base_layer = nf4
            self.__dict__["_nf4_base"] = None
        else:
            w = self.base_layer.weight
            w.copy_(w.float() - self.delta_weight())
        self.merged = False

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        nf4 = self.__dict__["_nf4_base"]
        if nf4 is not None:
            nf4._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, merged={self.merged}")
