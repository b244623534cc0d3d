"""The ``llmkern finetune`` workflow: evaluate the base LM on Text2SQL, QLoRA fine-tune it, evaluate again.

Stages, each leaving its result in ``out`` so that ``resume=True`` after an interrupt continues:

1. Build the seeded data set (:mod:`llmkern.finetune.data`): SQLite files in ``out/databases``.
2. Load the base model (the shipped ``llmkern/finetune/base`` unless ``base`` is given) and
   evaluate it on the test split -> ``out/eval_base.json`` (reused on resume).
3. :func:`llmkern.qlora.prepare_model`: NF4 base weights (``quantize=True``) with LoRA adapters on
   every linear layer, gradient checkpointing on; train the adapters with
   :class:`llmkern.train.Trainer` (AdamW, warmup + cosine, gradient accumulation), checkpoints every
   ``save_every`` steps in ``out/train`` (resume continues from the newest complete one).
4. Evaluate the fine-tuned model; write ``out/adapter`` (PEFT format), ``out/metrics.json``,
   ``out/predictions.jsonl`` and ``out/loss_curve.png``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import torch

from llmkern.finetune import report
from llmkern.finetune.config import FinetuneConfig
from llmkern.finetune.data import Dataset, Example, build_dataset, prompt
from llmkern.finetune.evaluate import evaluate
from llmkern.finetune.pretrain import BASE_DIR
from llmkern.finetune.sqleval import Evaluator
from llmkern.finetune.tokenizer import TextTokenizer, collate
from llmkern.models import Transformer
from llmkern.qlora import prepare_model, save_adapter
from llmkern.train import TrainConfig, Trainer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"llmkern finetune: device {name!r} was asked for but CUDA is not available")
    return device


def training_items(tokenizer: TextTokenizer, examples: list[Example]) -> list[dict[str, list[int]]]:
    """Each example as BOS + prompt + SQL + EOS, loss on the SQL and EOS only."""
    return [tokenizer.encode_pair(prompt(e.schema, e.question), e.sql) for e in examples]


def _check_resume(out: Path, cfg: FinetuneConfig) -> None:
    saved = out / "finetune_config.json"
    if cfg.resume and saved.exists():
        before = json.loads(saved.read_text())
        changed = {k: (before.get(k), v) for k, v in cfg.fingerprint().items() if before.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"llmkern finetune: --resume continues the run in {out}, whose settings differ ({detail}); "
                             f"use the same settings, or start over without --resume")
    if not cfg.resume:
        for stale in ("train", "eval_base.json", "metrics.json", "adapter"):
            path = out / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    saved.write_text(json.dumps(cfg.fingerprint(), indent=2) + "\n")


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)


def run(cfg: FinetuneConfig) -> dict:
    """Run the workflow of the module docstring; returns the content of ``metrics.json``."""
    started = time.perf_counter()
    say = _Log(cfg.progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, cfg)
    device = resolve_device(cfg.device)

    dataset: Dataset = build_dataset(out / "databases", seed=cfg.seed, n_test_seen=cfg.n_test_seen,
                                     n_test_held_out=cfg.n_test_held_out)
    summary = dataset.summary()
    c = summary["cleaning"]
    say(f"data: {summary['train']} train / {summary['valid']} valid / {summary['test_seen_schemas']} test pairs over "
        f"the training schemas + {summary['test_held_out_schemas']} over held-out schemas; cleaning kept {c['kept']}, "
        f"dropped {c['duplicate']} duplicates, {c['empty_result']} with empty results, {c['unexecutable']} unexecutable")

    base_dir = Path(cfg.base) if cfg.base else BASE_DIR
    torch.manual_seed(cfg.seed)
    model = Transformer.from_pretrained(base_dir).float().to(device)
    tokenizer = TextTokenizer.load(base_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"llmkern finetune: the tokenizer in {base_dir} has {tokenizer.vocab_size} tokens, more than "
                         f"the model's vocabulary of {model.config.vocab_size}")
    say(f"base model: {base_dir} ({model.num_parameters():,} parameters) on {device}")
    made = base_dir / "pretrain.json"
    base_seed = json.loads(made.read_text()).get("seed") if made.is_file() else cfg.seed
    if base_seed != cfg.seed:
        warnings.warn(f"llmkern finetune: the base model was pretrained on the corpus of seed {base_seed}, whose "
                      f"training draws may include test queries of seed {cfg.seed}; for a clean held-out evaluation, "
                      f"pretrain a base with `python -m llmkern.finetune.pretrain --seed {cfg.seed} --out DIR` and "
                      f"pass --base DIR", stacklevel=2)

    with Evaluator(dataset.databases) as evaluator:
        base_file = out / "eval_base.json"
        if cfg.resume and base_file.exists():
            base_metrics = json.loads(base_file.read_text())
            say(f"base evaluation: reused {base_file}")
        else:
            say(f"evaluating the base model on {len(dataset.test)} test questions...")
            base_metrics, _ = evaluate(model, tokenizer, dataset.test, evaluator, device, cfg.eval_batch_size,
                                       cfg.max_new_tokens)
            base_file.write_text(json.dumps(base_metrics, indent=2) + "\n")

        prepare_model(model, r=cfg.rank, lora_alpha=cfg.lora_alpha, quantize=cfg.quantize)
        train_cfg = TrainConfig(
            output_dir=str(out / "train"), max_steps=cfg.steps, micro_batch_size=cfg.micro_batch_size,
            grad_accum_steps=cfg.grad_accum_steps, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps),
            gradient_checkpointing=True, save_every=cfg.save_every, keep_checkpoints=2,
            eval_every=cfg.eval_every, seed=cfg.seed, resume=cfg.resume, progress=cfg.progress)
        trainer = Trainer(model, train_cfg, training_items(tokenizer, dataset.train),
                          training_items(tokenizer, dataset.valid), collate_fn=collate)
        train_result = trainer.train()

        say(f"evaluating the fine-tuned model on {len(dataset.test)} test questions...")
        tuned_metrics, predictions = evaluate(model, tokenizer, dataset.test, evaluator, device, cfg.eval_batch_size,
                                              cfg.max_new_tokens)

    save_adapter(model, out / "adapter")
    with open(out / "predictions.jsonl", "w") as f:
        for p in predictions:
            f.write(json.dumps({**dataclasses.asdict(p.example), "predicted": p.sql, "exact": p.exact,
                                "correct": p.correct, "error": p.error}, ensure_ascii=False) + "\n")
    tokens = train_result["tokens"]
    metrics = {
        "config": dataclasses.asdict(cfg), "device": str(device), "data": summary,
        "base": base_metrics, "finetuned": tuned_metrics,
        "train": {**train_result, "tokens_per_s": round(tokens / train_result["train_time_s"], 1)
                  if train_result["train_time_s"] > 0 else None,
                  "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    drawn = report.plot_loss(out / "train" / "metrics.jsonl", out / "loss_curve.png")
    say("")
    say(report.comparison_table(base_metrics, tuned_metrics))
    t = metrics["train"]
    say(f"\nQLoRA ({'NF4' if cfg.quantize else 'dense'} base, rank {cfg.rank}, {t['trainable_parameters']:,} trainable "
        f"parameters): {t['step']} steps, final loss {t['loss']:.4f}, {t['tokens_per_s']} tokens/s, peak memory "
        f"{report.format_bytes(t['memory_peak_bytes'])}")
    say(f"wrote {out / 'adapter'}, {out / 'metrics.json'}, {out / 'predictions.jsonl'}"
        + (f", {out / 'loss_curve.png'}" if drawn else " (no loss_curve.png: matplotlib is not installed)"))
    say(f"total time {metrics['wall_time_s']:.0f} s")
    return metrics
