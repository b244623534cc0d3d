"""How much memory a training setup needs: an analytic estimate, and the measured peak.

Estimate (:func:`estimate`), per process, in bytes:

* ``parameters``: every parameter and buffer (an NF4 weight counts its packed bytes and quantization
  state), exact for a model instance, computed from the shape otherwise; FSDP divides by the world size.
* ``gradients``: one gradient per trainable parameter, in its dtype.
* ``optimizer``: AdamW/paged AdamW two moments per trainable parameter, SGD one with momentum;
  ZeRO-1 and FSDP divide by the world size.
* ``activations``: the tensors the forward of one micro-batch saves for the backward (table below).
* ``transient``: the largest short-lived excess on top of the above at the moment of the peak
  (the loss's vocabulary-sized tensors, a layer's recomputation and gradient flow, optimizer temporaries).

``total`` is the peak of a steady-state step: the maximum over the phases of a step
(loss forward, loss backward, LM-head backward, top and bottom layer backward, optimizer step).

Saved activations per token and layer for a pre-norm decoder (llmkern's :class:`~llmkern.models.Transformer`
and Hugging Face's Llama family), with D = width, K = key/value width, F = MLP width, H = heads,
``e`` = bytes of the residual-stream dtype (the parameters'), ``c`` = bytes of the compute dtype
(``e``, or 2 under bf16/fp16 autocast):

=========================================  ==========================================================
two norms (residual input and 1/rms each)   2 (D e + 4); Hugging Face norms also keep the normalized
                                            input while their weight trains: + 2 D e
norm outputs (the projections' inputs)      2 D e; under autocast one cast copy per projection:
                                            5 D c (SwiGLU) or 4 D c (GELU MLP)
q and k after RoPE, v, attention output     (2 D + 2 K) c + 4 H (the fp32 log-sum-exp); the output,
                                            laid out (B, L, H, E), is o_proj's input without a copy
MLP                                         SwiGLU (gate, silu, up, product) 4 F c; GELU (up, gelu) 2 F c
LoRA, per adapted linear                    4 r (the fp32 ``x @ A.T`` kept for ``dB``)
=========================================  ==========================================================

Outside the layers: token ids (8 bytes per token), the final norm (2 D e + 4 per token), RoPE's
cos/sin (2 L E 4 bytes per sequence: per layer in llmkern, once in Hugging Face), under autocast a
compute-dtype copy of every linear weight (kept until that layer's backward), and the loss: logits
(V c per token), their fp32 log-softmax (4 V), and in the backward the gradients of both (2 x 4 V).
With gradient checkpointing a layer keeps only its inputs (2 D e for llmkern: hidden and residual;
D e for Hugging Face) and rebuilds its full set during its own backward. The gradients alive at a
phase grow from the head down (all of them from the second micro-batch on when accumulating).
The model is described by :class:`ModelShape`.

Measured against :class:`MemoryTracker` on CPU for small llmkern and Hugging Face Llama models
(full, LoRA, QLoRA, with and without checkpointing, fp32 and bf16 autocast) the estimate is within
about 6% (tests/test_memory.py prints each case). Not modelled: memory that kernels allocate and
free internally, allocator caching and fragmentation on CUDA, attention implementations that
materialise the (L, L) score matrix.

Measurement (:class:`PeakMemory`): on CUDA the caching allocator's ``max_memory_allocated``; on
CPU :class:`MemoryTracker`, a ``TorchDispatchMode`` that counts the bytes of every live tensor
storage created under it (plus the tensors handed to it at the start) and records the maximum.
"""
from llmkern.train.memory.estimate import METHODS, MemoryEstimate, estimate
from llmkern.train.memory.measure import MemoryTracker, PeakMemory, format_bytes
from llmkern.train.memory.shape import ModelShape, gradient_checkpointing_enabled, model_tensors

__all__ = ["METHODS", "MemoryEstimate", "MemoryTracker", "ModelShape", "PeakMemory", "estimate", "format_bytes",
           "gradient_checkpointing_enabled", "model_tensors"]
