"""``Trainer``: the training loop (accumulation, mixed precision, clipping, checkpoints, evaluation, DDP/ZeRO/FSDP)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from llmkern.qlora import enable_gradient_checkpointing
from llmkern.train import distributed, memory, state
from llmkern.train.checkpoint import checkpoint_root, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from llmkern.train.config import TrainConfig
from llmkern.train.data import GlobalBatchOrder, pad_collate
from llmkern.train.loss import causal_lm_loss_sum, count_targets, logits_of
from llmkern.train.metrics import MetricsLog
from llmkern.train.optim import build_optimizer, lr_at
from llmkern.train.precision import LossScaler, autocast

logger = logging.getLogger("llmkern.train")

MEMORY_STEPS = 2


class Trainer:
    """Train ``model`` on ``train_dataset`` as ``config`` says.

    Args:
        model: any ``nn.Module`` called as ``model(input_ids=..., attention_mask=...)`` (every key of
            the collated batch except ``labels``; Hugging Face models also get ``use_cache=False``)
            and returning logits (B, L, V), a ``(logits, loss)`` tuple or an object with ``.logits``.
            Its own loss is ignored: the trainer computes the causal-LM loss (``logits[:, t]``
            predicts ``labels[:, t + 1]``; no shift when ``model.config.causal`` is False) summed
            over all target tokens of the global batch and divided by their number.
        config: a :class:`TrainConfig`.
        train_dataset, eval_dataset: indexable sequences of dicts with ``input_ids`` and ``labels``
            (-100 = not a target).
        collate_fn: list of items -> dict of (B, L) tensors; default :func:`pad_collate`.

    Under ``torchrun`` each process builds the same model and calls :meth:`train`; only rank 0
    logs, shows progress and writes checkpoints and ``metrics.jsonl``.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_dataset: Sequence[dict],
                 eval_dataset: Sequence[dict] | None = None, collate_fn: Callable | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"llmkern.train.Trainer: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"llmkern.train.Trainer: config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.ctx = distributed.setup(model)
        self.model = model.to(self.ctx.device)
        model_config = getattr(model, "config", None)
        self.shift = bool(getattr(model_config, "causal", True))
        self.extra_inputs = {"use_cache": False} if hasattr(model_config, "use_cache") else {}
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collate_fn = collate_fn or pad_collate
        self.fsdp = config.fsdp and self.ctx.distributed
        self.wrapped = distributed.wrap(model, self.ctx, self.fsdp)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer, self.param_names = build_optimizer(
            named, config, self.ctx.device, zero=config.zero == 1 and self.ctx.distributed)
        self.params = [p for _, p in named]
        self.scaler = LossScaler(config.mixed_precision == "fp16")
        self.global_batch_size = config.micro_batch_size * config.grad_accum_steps * self.ctx.world_size
        self.order = GlobalBatchOrder(len(train_dataset), self.global_batch_size, config.seed)
        self.step = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.last_metrics: dict = {}
        self.memory_estimate: memory.MemoryEstimate | None = None
        self.memory_peak: int | None = None

    # ------------------------------------------------------------------ reporting
    def _say(self, message: str, bar=None) -> None:
        if not self.ctx.is_main:
            return
        logger.info(message)
        if self.config.progress:
            (bar.write if bar is not None else print)(message)

    def _warn(self, message: str) -> None:
        if self.ctx.is_main:
            logger.warning(message)

    # ------------------------------------------------------------------ one step
    def _batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        cfg = self.config
        micro = self.order.micro_batches(step, cfg.micro_batch_size, cfg.grad_accum_steps,
                                         self.ctx.rank, self.ctx.world_size)
        return [self.collate_fn([self.train_dataset[i] for i in idx]) for idx in micro]

    def _forward_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.to(self.ctx.device) for k, v in batch.items() if k != "labels"}
        with autocast(self.config.mixed_precision, self.ctx.device):
            output = self.wrapped(**inputs, **self.extra_inputs)
        return causal_lm_loss_sum(logits_of(output), batch["labels"].to(self.ctx.device), self.shift)

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _train_step(self, step: int) -> dict:
        cfg, ctx = self.config, self.ctx
        t0 = time.perf_counter()
        batches = self._batches(step)
        n_local = sum(count_targets(b["labels"], self.shift) for b in batches)
        tokens_local = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                           for b in batches)
        n_targets, tokens = distributed.all_reduce_sum([n_local, tokens_local], ctx)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        record = {"step": step + 1, "epoch": self.order.position(step)[0], "lr": lr, "tokens": int(tokens),
                  "targets": int(n_targets)}
        if n_targets == 0:
            self._warn(f"llmkern.train: step {step + 1}: the global batch has no target tokens (all labels -100); "
                       f"skipped the update")
            self.skipped_steps += 1
            return {**record, "loss": float("nan"), "grad_norm": float("nan"), "skipped": True,
                    "time_s": time.perf_counter() - t0}
        # DDP/FSDP average gradients over processes; multiplying by world_size turns that into a sum.
        factor = ctx.world_size * self.scaler.scale / n_targets
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for j, batch in enumerate(batches):
            with distributed.gradient_sync(self.wrapped, j == len(batches) - 1):
                part = self._forward_loss_sum(batch)
                (part * factor).backward()
            loss_sum += part.detach()
        loss = distributed.all_reduce_sum([float(loss_sum)], ctx)[0] / n_targets
        self.scaler.unscale_([p.grad for p in self.params if p.grad is not None])
        grad_norm = self._grad_norm()
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.skipped_steps += 1
            scale_note = (f"; loss scale {self.scaler.scale:g} -> {self.scaler.scale * self.scaler.backoff_factor:g}"
                          if self.scaler.enabled else "")
            self._warn(f"llmkern.train: step {step + 1}: gradients are not finite (norm {grad_norm}); "
                       f"skipped the update{scale_note}")
        else:
            self.optimizer.step()
        self.scaler.update(found_inf=skipped)
        self.optimizer.zero_grad(set_to_none=True)
        record.update(loss=loss, grad_norm=grad_norm, skipped=skipped, time_s=time.perf_counter() - t0)
        if self.scaler.enabled:
            record["loss_scale"] = self.scaler.scale
        return record

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean causal-LM loss over ``eval_dataset`` (every process takes a strided share)."""
        if self.eval_dataset is None:
            raise ValueError("llmkern.train.Trainer.evaluate: no eval_dataset was given")
        cfg, ctx = self.config, self.ctx
        n = len(self.eval_dataset)
        chunk = cfg.micro_batch_size * ctx.world_size
        self.model.eval()
        loss_sum, targets = 0.0, 0
        try:
            for start in range(0, n, chunk):
                lo = start + ctx.rank * cfg.micro_batch_size
                idx = list(range(lo, min(lo + cfg.micro_batch_size, n)))
                # Every process runs the same number of forwards (FSDP gathers parameters in each);
                # a process with no examples left repeats example 0 and ignores the result.
                batch = self.collate_fn([self.eval_dataset[i] for i in (idx or [0])])
                part = self._forward_loss_sum(batch)
                if idx:
                    loss_sum += float(part)
                    targets += count_targets(batch["labels"], self.shift)
        finally:
            self.model.train()
        loss_sum, targets = distributed.all_reduce_sum([loss_sum, targets], ctx)
        return {"eval_loss": loss_sum / targets if targets else float("nan"), "eval_targets": int(targets)}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (collective under torchrun); rank 0 returns its path."""
        model_t = state.model_tensors(self.model, self.param_names, self.fsdp)
        opt_t, opt_doc = state.optimizer_content(self.model, self.optimizer, self.param_names, self.fsdp, self.ctx)
        rng_t, rng_docs = state.rng_content(self.ctx)
        path = None
        if self.ctx.is_main:
            epoch, index = self.order.position(self.step)
            doc = {"step": self.step, "epoch": epoch, "batch_in_epoch": index,
                   "global_batch_size": self.global_batch_size, "world_size": self.ctx.world_size,
                   "skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen,
                   "optimizer": opt_doc, "scaler": self.scaler.state_dict(), "rng": rng_docs,
                   "config": self.config.to_dict(), "metrics": self.last_metrics}
            path = save_checkpoint(self.config.output_dir, self.step,
                                   {"model": model_t, "optimizer": opt_t, "rng": rng_t},
                                   {"trainer_state": doc}, keep=self.config.keep_checkpoints)
        distributed.barrier(self.ctx)
        return path

    def _resume(self) -> bool:
        """Load the newest complete checkpoint; ``False`` when there is none."""
        found = latest_checkpoint(self.config.output_dir) if self.ctx.is_main else None
        step = distributed.broadcast_int(found[0] if found else -1, self.ctx)
        if step < 0:
            self._say(f"llmkern.train: resume=True but no complete checkpoint in {checkpoint_root(self.config.output_dir)}; "
                      f"starting from step 0")
            return False
        if found is not None:
            _, path, tensors, documents = found
        else:
            path = checkpoint_root(self.config.output_dir) / f"step-{step:08d}"
            tensors, documents = load_checkpoint(path)
        doc = documents["trainer_state"]
        state.load_model_tensors(self.model, tensors["model"], self.param_names, self.fsdp)
        state.load_optimizer_content(self.model, self.optimizer, self.param_names, self.fsdp,
                                     tensors["optimizer"], doc["optimizer"])
        self.scaler.load_state_dict(doc["scaler"])
        self.step = doc["step"]
        self.skipped_steps = doc["skipped_steps"]
        self.tokens_seen = doc["tokens_seen"]
        self.last_metrics = doc["metrics"]
        if doc["global_batch_size"] != self.global_batch_size:
            self._warn(f"llmkern.train: the checkpoint was written with global batch size {doc['global_batch_size']}, "
                       f"this run uses {self.global_batch_size}: the data order differs from the original run")
        if doc["world_size"] == self.ctx.world_size:
            state.restore_rng(tensors["rng"], doc["rng"], self.ctx.rank)
        else:
            self._warn(f"llmkern.train: the checkpoint was written by {doc['world_size']} processes, this run has "
                       f"{self.ctx.world_size}: RNG states are reseeded, not restored")
            torch.manual_seed(self.config.seed + 1_000_003 * self.step + self.ctx.rank)
        self._say(f"llmkern.train: resumed from {path} (step {self.step})")
        return True

    # ------------------------------------------------------------------ memory
    def _live_tensors(self) -> list[torch.Tensor]:
        tensors = memory.model_tensors(self.model) + [p.grad for p in self.params if p.grad is not None]
        for s in self.optimizer.state.values():
            tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
        return tensors

    def _estimate_memory(self, seq_len: int) -> memory.MemoryEstimate:
        cfg = self.config
        return memory.estimate(self.model, batch_size=cfg.micro_batch_size, seq_len=seq_len,
                               mixed_precision=cfg.mixed_precision, optimizer=cfg.optimizer,
                               grad_accum_steps=cfg.grad_accum_steps, world_size=self.ctx.world_size,
                               zero=cfg.zero, fsdp=self.fsdp)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run from the current (or resumed) step to ``max_steps``; returns the final metrics:
        ``step``, ``loss``, ``eval_loss`` (with an eval set), ``skipped_steps``, ``tokens``,
        ``train_time_s``, ``memory_estimate_bytes``, ``memory_peak_bytes``."""
        cfg, ctx = self.config, self.ctx
        resumed = cfg.resume and self._resume()
        if not resumed:
            torch.manual_seed(cfg.seed + ctx.rank)
            if not cfg.resume and list_checkpoints(cfg.output_dir):
                self._warn(f"llmkern.train: {checkpoint_root(cfg.output_dir)} already holds checkpoints and resume=False: "
                           f"this run overwrites those of the same steps, and a later resume=True takes the newest")
        log = MetricsLog(Path(cfg.output_dir) / "metrics.jsonl", ctx.is_main, self.step if resumed else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.params)
        self._say(f"llmkern.train: {n_train:,} trainable of {n_params:,} parameters ({100 * n_train / max(n_params, 1):.2f}%); "
                  f"global batch {self.global_batch_size} = {cfg.micro_batch_size} x {cfg.grad_accum_steps} accumulation "
                  f"x {ctx.world_size} process(es); device {ctx.device}; mixed precision {cfg.mixed_precision}")
        start_step = self.step
        if cfg.report_memory and start_step < cfg.max_steps:
            seq_len = max(b["input_ids"].shape[1] for b in self._batches(start_step))
            self.memory_estimate = self._estimate_memory(seq_len)
            self._say(f"llmkern.train: estimated peak memory per process {self.memory_estimate}")
        last_saved = None
        evaluation: dict | None = None
        t_start = time.perf_counter()
        with tqdm(total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and ctx.is_main),
                  desc="train", dynamic_ncols=True) as bar, contextlib.ExitStack() as measuring:
            peak = measuring.enter_context(memory.PeakMemory(ctx.device, self._live_tensors())) \
                if cfg.report_memory and start_step < cfg.max_steps else None
            for step in range(start_step, cfg.max_steps):
                record = self._train_step(step)
                if peak is not None and (step - start_step + 1 == MEMORY_STEPS or step + 1 == cfg.max_steps):
                    measuring.close()
                    self.memory_peak, peak = peak.peak_bytes, None
                    self._report_peak(bar)
                self.step = step + 1
                self.tokens_seen += record["tokens"]
                record["tokens_per_s"] = record["tokens"] / record["time_s"]
                self.last_metrics = record
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if self.eval_dataset is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    evaluation = {"step": self.step, **self.evaluate()}
                    log.write(evaluation)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
        final = {"step": self.step, "loss": self.last_metrics.get("loss", float("nan")),
                 "skipped_steps": self.skipped_steps, "tokens": self.tokens_seen,
                 "train_time_s": time.perf_counter() - t_start,
                 "memory_estimate_bytes": self.memory_estimate.total if self.memory_estimate else None,
                 "memory_peak_bytes": self.memory_peak}
        if self.eval_dataset is not None:
            if evaluation is None or evaluation["step"] != self.step:
                evaluation = {"step": self.step, **self.evaluate()}
                log.write(evaluation)
            final.update(evaluation)
        if self.step > start_step and last_saved != self.step:
            self.save_checkpoint()
        return final

    def _report_peak(self, bar) -> None:
        how = "CUDA allocator" if self.ctx.device.type == "cuda" else "tensor-allocation tracker"
        est = self.memory_estimate
        note = ""
        if est is not None and est.activations is not None:
            note = f" (estimate {memory.format_bytes(est.total)}, error {100 * (est.total - self.memory_peak) / self.memory_peak:+.1f}%)"
        self._say(f"llmkern.train: measured peak memory over the first steps {memory.format_bytes(self.memory_peak)} "
                  f"[{how}]{note}", bar)
