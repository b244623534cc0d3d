"""Drop-in ``torch.nn`` modules backed by llmkern ops (same constructors and state_dict keys as their counterparts)."""
from llmkern.nn.attention import Attention
from llmkern.nn.kv_cache import KVCache
from llmkern.nn.linear_nf4 import LinearNF4
from llmkern.nn.lora import LoRALinear
from llmkern.nn.norm import LayerNorm, RMSNorm
from llmkern.nn.rotary import RotaryEmbedding

__all__ = ["Attention", "KVCache", "RotaryEmbedding", "LayerNorm", "RMSNorm", "LinearNF4", "LoRALinear"]
