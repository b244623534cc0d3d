"""The functional API: autograd-aware ``torch.library`` custom ops that dispatch to a backend.

See ../../README.md and DESIGN.md for the contract of each function.
"""
from llmkern.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
