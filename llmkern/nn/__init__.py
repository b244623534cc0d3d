"""Drop-in ``torch.nn`` modules backed by llmkern ops (same constructors and state_dict keys as their counterparts)."""
from llmkern.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
