"""A compact transformer built from llmkern modules: decoder LM (GPT/Llama style) or encoder (BERT style).

``TransformerConfig`` (config.py) -> ``Transformer`` (transformer.py) made of ``Block`` (block.py):
fused add+norm, :class:`llmkern.nn.Attention`, GELU/SwiGLU MLP (mlp.py); positions (positions.py);
``generate`` (generate.py); ``save_pretrained``/``from_pretrained`` (serialization.py).
"""
from llmkern.models.config import TransformerConfig
from llmkern.models.transformer import Transformer

__all__ = ["Transformer", "TransformerConfig"]
