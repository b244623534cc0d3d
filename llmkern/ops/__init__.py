"""The functional API: autograd-aware ``torch.library`` custom ops that dispatch to a backend.

See ../../README.md and DESIGN.md for the contract of each function.
"""
from llmkern.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from llmkern.ops.attention import scaled_dot_product_attention
from llmkern.ops.nf4 import nf4_dequantize, nf4_linear, nf4_quantize
from llmkern.ops.quant import int8_dequantize, int8_quantize
from llmkern.ops.lora import lora_linear

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "scaled_dot_product_attention",
           "nf4_quantize", "nf4_dequantize", "nf4_linear", "lora_linear",
           "int8_quantize", "int8_dequantize"]
