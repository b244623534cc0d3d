"""``QuantState``: everything needed to dequantize an NF4 tensor, in bitsandbytes' layout.

A tensor ``x`` of ``shape`` (n elements) quantized by :func:`llmkern.ops.nf4_quantize` becomes

``packed``: uint8, shape ``((n + 1) // 2, 1)`` (bitsandbytes' ``Params4bit`` layout), contiguous.
    Byte ``j`` holds elements ``2j`` (**high nibble**, ``byte >> 4``) and ``2j + 1`` (low nibble,
    ``byte & 0xF``) of ``x.reshape(-1)``. An odd ``n`` pads the last low nibble with code 7 (zero).
    For a weight ``(out_features, in_features)`` element ``(r, c)`` is nibble ``r * in_features + c``.
    The nibble is an index into :attr:`code`, the NF4 table::

        [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

Per-block scale: element ``i`` belongs to block ``i // blocksize`` and dequantizes to
``float32(code[nibble] * absmax_f32[i // blocksize])``, where

* without double quantization (``nested`` False): ``absmax`` is float32, shape ``(nblocks,)``,
  ``nblocks = ceil(n / blocksize)``, and ``absmax_f32 = absmax``;
* with double quantization (``nested`` True): ``absmax`` is uint8, shape ``(nblocks,)``: codes into
  ``state2.code`` (the 256-entry dynamic map, float32); ``state2.absmax`` is float32, shape
  ``(ceil(nblocks / 256),)`` with ``state2.blocksize == 256``; ``offset`` is a 0-dim float32 tensor;
  ``absmax_f32[b] = float32(float32(state2.code[absmax[b]] * state2.absmax[b // 256]) + offset)``
  (two roundings: no fused multiply-add).

:meth:`QuantState.as_dict` / :meth:`QuantState.from_dict` use bitsandbytes' state-dict keys
(``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``, and with ``packed=True`` one
uint8 tensor ``quant_state.bitsandbytes__nf4`` holding the JSON of ``quant_type``, ``blocksize``,
``dtype``, ``shape``, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``).
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from llmkern.reference.nf4 import BLOCKSIZES, NESTED_BLOCKSIZE, dynamic_code, nf4_code

QUANT_TYPES = ("nf4",)
_PACKED_KEY = "quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _parse_dtype(name: Any, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"llmkern.QuantState: {key} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class QuantState:
    """Quantization state of one NF4 tensor (see the module docstring for the exact layout).

    Attributes: ``absmax``, ``shape`` (torch.Size of the original tensor), ``dtype`` (its dtype),
    ``blocksize``, ``quant_type`` (``"nf4"``), ``code`` ((16,) float32 NF4 table), ``offset``
    (0-dim float32 or None), ``state2`` (nested state with ``absmax``, ``code``, ``blocksize``,
    ``dtype`` float32, or None), ``nested`` (bool).
    """

    def __init__(self, absmax: torch.Tensor, shape, dtype: torch.dtype, blocksize: int, code: torch.Tensor | None = None,
                 quant_type: str = "nf4", offset: torch.Tensor | None = None, state2: "QuantState | None" = None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.quant_type = quant_type
        self.code = code if code is not None else nf4_code(absmax.device)
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    @classmethod
    def nested_state(cls, absmax: torch.Tensor, code: torch.Tensor | None = None,
                     blocksize: int = NESTED_BLOCKSIZE) -> "QuantState":
        """The ``state2`` of a double-quantized state: float32 ``absmax`` of the 256-blocks of codes."""
        return cls(absmax, shape=None, dtype=torch.float32, blocksize=blocksize,
                   code=code if code is not None else dynamic_code(absmax.device), quant_type=None)

    def validate(self, packed: torch.Tensor | None = None, where: str = "QuantState", values: bool = False) -> None:
        """Raise ``ValueError`` naming the field if this state is inconsistent (with ``packed`` if given).

        Checks metadata, dtypes and lengths; ``values=True`` also compares ``quant_map`` with the NF4
        table (reads tensor data: done when a state is loaded, not on every op call).
        """
        def bad(msg):
            raise ValueError(f"llmkern.{where}: {msg}")

        if self.quant_type not in QUANT_TYPES:
            bad(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            bad(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.shape is None or self.numel < 1:
            bad(f"shape must be a non-empty tensor shape, got {self.shape}")
        if self.dtype not in _DTYPES.values():
            bad(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if not isinstance(self.code, torch.Tensor) or self.code.numel() != 16 or (values and not torch.equal(
                self.code.detach().to("cpu", torch.float32).reshape(-1), nf4_code())):
            bad("quant_map must be the 16-entry NF4 table")
        nb = self.num_blocks
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != nb:
            bad(f"absmax must be {_dtype_name(want)} with {nb} entries (shape {tuple(self.shape)}, blocksize "
                f"{self.blocksize}), got {_dtype_name(self.absmax.dtype)} with {self.absmax.numel()}")
        if self.nested:
            s2 = self.state2
            if s2.blocksize != NESTED_BLOCKSIZE:
                bad(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {s2.blocksize}")
            nb2 = -(-nb // s2.blocksize)
            if s2.absmax.dtype != torch.float32 or s2.absmax.numel() != nb2:
                bad(f"nested_absmax must be float32 with {nb2} entries, got {_dtype_name(s2.absmax.dtype)} "
                    f"with {s2.absmax.numel()}")
            if s2.code.dtype != torch.float32 or s2.code.numel() != 256:
                bad(f"nested_quant_map must be float32 with 256 entries, got {_dtype_name(s2.code.dtype)} "
                    f"with {s2.code.numel()}")
            if self.offset is None or self.offset.numel() != 1:
                bad("a nested state needs a scalar nested_offset")
        if packed is not None:
            want_bytes = (self.numel + 1) // 2
            if packed.dtype != torch.uint8 or packed.numel() != want_bytes:
                bad(f"the packed weight must be uint8 with {want_bytes} bytes for shape {tuple(self.shape)}, got "
                    f"{_dtype_name(packed.dtype)} with {packed.numel()} elements")

    # ---- bitsandbytes state-dict format ----------------------------------------------------------------------

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes' ``QuantState.as_dict``: tensors and plain values, or with
        ``packed=True`` tensors only (non-tensor items in the uint8 JSON tensor ``quant_state.bitsandbytes__nf4``)."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": self.offset.item(),
            })
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors[_PACKED_KEY + self.quant_type] = torch.tensor(list(json.dumps(rest).encode("utf-8")), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str | None = None) -> "QuantState":
        """Build a state from :meth:`as_dict` output (packed or not; keys may carry a prefix such as
        ``weight.``). Raises ``ValueError`` for a missing, unknown or inconsistent item."""
        items = {}
        for key, value in d.items():
            at = key.find("quant_state.")
            items[key[at:] if at >= 0 else key.split(".")[-1]] = value
        packed_keys = [k for k in items if k.startswith("quant_state.")]
        if "quant_type" not in items:
            if len(packed_keys) != 1:
                raise ValueError(f"llmkern.QuantState.from_dict: expected exactly one '{_PACKED_KEY}<type>' item, "
                                 f"got {packed_keys or 'none'}")
        for key in packed_keys:
            qtype = key.rsplit("bitsandbytes__", 1)[-1] if "bitsandbytes__" in key else key
            if qtype not in QUANT_TYPES:
                raise ValueError(f"llmkern.QuantState.from_dict: unknown quant type {qtype!r} in {key!r}; "
                                 f"supported: {QUANT_TYPES}")
            tensor = items.pop(key)
            try:
                meta = json.loads(bytes(tensor.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"llmkern.QuantState.from_dict: {key!r} does not hold valid JSON ({exc})") from exc
            if not isinstance(meta, dict):
                raise ValueError(f"llmkern.QuantState.from_dict: {key!r} must hold a JSON object, got {type(meta).__name__}")
            items.update(meta)
        known = {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_type", "blocksize", "dtype",
                 "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
        unknown = set(items) - known
        if unknown:
            raise ValueError(f"llmkern.QuantState.from_dict: unknown items {sorted(unknown)}")
        missing = {"absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"} - set(items)
        if "nested_absmax" in items:
            missing |= {"nested_quant_map", "nested_blocksize", "nested_offset"} - set(items)
        if missing:
            raise ValueError(f"llmkern.QuantState.from_dict: missing items {sorted(missing)}")

        def to_dev(t):
            return t.to(device) if device is not None else t

        absmax = to_dev(items["absmax"])
        state2 = offset = None
        if "nested_absmax" in items:
            state2 = QuantState(to_dev(items["nested_absmax"]), shape=None,
                                dtype=_parse_dtype(items.get("nested_dtype", "float32"), "nested_dtype"),
                                blocksize=int(items["nested_blocksize"]), code=to_dev(items["nested_quant_map"]),
                                quant_type=None)
            offset = torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=absmax.device)
        shape = items["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape):
            raise ValueError(f"llmkern.QuantState.from_dict: shape must be a list of ints, got {shape!r}")
        state = cls(absmax, shape=shape, dtype=_parse_dtype(items["dtype"], "dtype"), blocksize=int(items["blocksize"]),
                    code=to_dev(items["quant_map"]), quant_type=items["quant_type"], offset=offset, state2=state2)
        state.validate(where="QuantState.from_dict", values=True)
        return state

    @classmethod
    def from_bnb(cls, s) -> "QuantState":
        """Convert a ``bitsandbytes.functional.QuantState`` (nf4) into a :class:`QuantState` (tensors shared)."""
        state2 = None
        if getattr(s, "nested", False):
            state2 = QuantState(s.state2.absmax, shape=None, dtype=s.state2.dtype, blocksize=s.state2.blocksize,
                                code=s.state2.code, quant_type=None)
        offset = None if s.offset is None else torch.as_tensor(s.offset, dtype=torch.float32, device=s.absmax.device)
        state = cls(s.absmax, shape=s.shape, dtype=s.dtype, blocksize=s.blocksize, code=s.code,
                    quant_type=s.quant_type, offset=offset, state2=state2)
        state.validate(where="QuantState.from_bnb", values=True)
        return state

    def to_bnb(self):
        """The equivalent ``bitsandbytes.functional.QuantState`` (needs bitsandbytes installed)."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        state2 = None
        if self.nested:
            state2 = BnbQuantState(absmax=self.state2.absmax, code=self.state2.code, blocksize=self.state2.blocksize,
                                   dtype=self.state2.dtype)
        return BnbQuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                             quant_type=self.quant_type, dtype=self.dtype, offset=self.offset, state2=state2)

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy of the state with every tensor on ``device``."""
        state2 = None
        if self.nested:
            state2 = QuantState(self.state2.absmax.to(device), shape=None, dtype=self.state2.dtype,
                                blocksize=self.state2.blocksize, code=self.state2.code.to(device), quant_type=None)
        return QuantState(self.absmax.to(device), shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                          code=self.code.to(device), quant_type=self.quant_type,
                          offset=None if self.offset is None else self.offset.to(device), state2=state2)

    def equal(self, other: "QuantState") -> bool:
        """True when both states hold the same metadata and bit-identical tensors."""
        if not isinstance(other, QuantState) or self.nested != other.nested:
            return False
        same = (self.shape == other.shape and self.dtype == other.dtype and self.blocksize == other.blocksize
                and self.quant_type == other.quant_type and torch.equal(self.absmax.cpu(), other.absmax.cpu())
                and torch.equal(self.code.cpu(), other.code.cpu()))
        if same and self.nested:
            same = (torch.equal(self.offset.cpu(), other.offset.cpu())
                    and self.state2.blocksize == other.state2.blocksize
                    and torch.equal(self.state2.absmax.cpu(), other.state2.absmax.cpu())
                    and torch.equal(self.state2.code.cpu(), other.state2.code.cpu()))
        return same

    def __repr__(self) -> str:
        nested = f", nested(blocksize={self.state2.blocksize})" if self.nested else ""
        return (f"QuantState({self.quant_type}, shape={tuple(self.shape)}, dtype={_dtype_name(self.dtype)}, "
                f"blocksize={self.blocksize}{nested})")
