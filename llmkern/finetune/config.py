"""``FinetuneConfig``: the settings of a ``llmkern finetune`` run (light to import: the CLI reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneConfig:
    """Everything a ``llmkern finetune`` run does (the CLI's options, plus the data set's sizes).

    ``lora_alpha`` defaults to ``2 * rank``; ``eval_every`` (validation loss) to a quarter of ``steps``.
    The global batch is ``micro_batch_size * grad_accum_steps``.
    """

    out: str = "finetune-out"
    steps: int = 300
    rank: int = 16
    lora_alpha: float | None = None
    quantize: bool = True
    micro_batch_size: int = 8
    grad_accum_steps: int = 2
    lr: float = 2e-3
    warmup_steps: int = 20
    save_every: int = 25
    eval_every: int | None = None
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    base: str | None = None
    eval_batch_size: int = 32
    max_new_tokens: int = 128
    n_test_seen: int = 160
    n_test_held_out: int = 96
    progress: bool = True

    def __post_init__(self):
        name = "llmkern.finetune.FinetuneConfig"
        for field in ("steps", "rank", "micro_batch_size", "grad_accum_steps", "eval_batch_size", "max_new_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be a positive int, got {value!r}")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.rank
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 4)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"{name}: device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    # what a resumed run must share with the run it continues
    _RESUME_KEYS = ("steps", "rank", "lora_alpha", "quantize", "micro_batch_size", "grad_accum_steps", "lr",
                    "warmup_steps", "seed", "base", "max_new_tokens", "n_test_seen", "n_test_held_out")

    def fingerprint(self) -> dict:
        return {k: getattr(self, k) for k in self._RESUME_KEYS}
