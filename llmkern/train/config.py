"""``TrainConfig``: every knob of a :class:`~llmkern.train.Trainer` run, checked once, stored in each checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OPTIMIZERS = ("adamw", "paged_adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """What a training run does. A feature whose value is 0 (``max_grad_norm``, ``save_every``,
    ``eval_every``, ``warmup_steps``, ``keep_checkpoints``) is off.

    Attributes:
        output_dir: where checkpoints (``checkpoints/step-XXXXXXXX/``) and ``metrics.jsonl`` go.
        max_steps: optimizer steps to run in total (a resumed run counts the steps already done).
        micro_batch_size: examples per forward/backward pass (per process under ``torchrun``).
        grad_accum_steps: micro-batches accumulated into one optimizer step. The global batch is
            ``micro_batch_size * grad_accum_steps * world_size`` examples; its loss is the mean over
            all of its target tokens, so any split of the same global batch gives the same update.
        lr: peak learning rate. optimizer: "adamw" (``torch.optim.AdamW``), "paged_adamw"
            (bitsandbytes' paged AdamW, CUDA only) or "sgd". weight_decay: decoupled for AdamW.
        warmup_steps: linear warmup from ``lr / warmup_steps`` to ``lr``. lr_schedule: "cosine"
            (from ``lr`` after warmup towards 0 at ``max_steps``) or "constant".
        max_grad_norm: clip the global gradient norm to this value.
        mixed_precision: "no" (parameters' dtype), "bf16" (autocast) or "fp16" (autocast plus
            dynamic loss scaling; a step whose gradients overflow is skipped and logged).
            Parameters and optimizer state keep their own dtype (fp32 master state).
        gradient_checkpointing: turn the model's activation checkpointing on (``False`` leaves the
            model's own setting, e.g. the one :func:`llmkern.qlora.prepare_model` chose).
        save_every: write a checkpoint every this many steps (one is always written at the end).
        eval_every: evaluate on ``eval_dataset`` every this many steps (and at the end).
        seed: seeds the data order and, at the start of a fresh run, torch's RNG (dropout).
        resume: continue from the newest complete checkpoint in ``output_dir``, if any.
        zero: 1 shards optimizer state across processes (``ZeroRedundancyOptimizer``); 0 does not.
        fsdp: shard parameters, gradients and optimizer state with FSDP2 ``fully_shard``.
        progress: show a tqdm progress bar and print the start-up report (rank 0 only).
        report_memory: estimate the peak memory at the start and measure it over the first two steps
            (on CPU the measurement runs those steps under a tensor-allocation tracker, which is slower).
        log_every: write a ``metrics.jsonl`` line every this many steps.
        keep_checkpoints: keep only the newest this many checkpoints (0 keeps all).
        adam_betas, adam_eps: AdamW's coefficients. momentum: SGD momentum.
    """

    output_dir: str
    max_steps: int
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    save_every: int = 0
    eval_every: int = 0
    seed: int = 0
    resume: bool = False
    zero: int = 0
    fsdp: bool = False
    progress: bool = True
    report_memory: bool = True
    log_every: int = 1
    keep_checkpoints: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    momentum: float = 0.0

    def __post_init__(self):
        name = "llmkern.train.TrainConfig"
        self.output_dir = str(self.output_dir)
        for field in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}")
        for field in ("warmup_steps", "save_every", "eval_every", "keep_checkpoints", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {field} must be an int >= 0, got {value!r}")
        for field, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                               ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{name}: {field} must be one of {allowed}, got {getattr(self, field)!r}")
        for field in ("lr", "weight_decay", "max_grad_norm", "adam_eps", "momentum"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: {field} must be a number >= 0, got {value!r}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"{name}: warmup_steps must be <= max_steps ({self.max_steps}), got {self.warmup_steps}")
        if self.zero not in (0, 1):
            raise ValueError(f"{name}: zero must be 0 or 1 (fsdp=True also shards gradients and parameters), "
                             f"got {self.zero!r}")
        if self.zero and self.fsdp:
            raise ValueError(f"{name}: zero=1 and fsdp=True exclude each other (FSDP already shards optimizer state)")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"{name}: adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``adam_betas`` as a list)."""
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d
