"""Training: :class:`Trainer` and :class:`TrainConfig` (gradient accumulation, mixed precision,
gradient checkpointing, atomic checkpoints with exact resume, DDP / ZeRO-1 / FSDP2 under torchrun)
and :mod:`llmkern.train.memory` (memory estimate and measured peak).

Modules: ``config`` (TrainConfig), ``trainer`` (the loop), ``data`` (data order, padding collate),
``loss`` (causal-LM loss), ``optim`` (optimizers, LR schedule), ``precision`` (autocast, loss
scaling), ``checkpoint`` (files), ``state`` (what a checkpoint holds), ``distributed`` (torchrun
setup), ``metrics`` (metrics.jsonl), ``memory`` (estimate and measurement).
"""
from llmkern.train import memory
from llmkern.train.config import TrainConfig
from llmkern.train.data import GlobalBatchOrder, pad_collate
from llmkern.train.trainer import Trainer

__all__ = ["GlobalBatchOrder", "TrainConfig", "Trainer", "memory", "pad_collate"]
