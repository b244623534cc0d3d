"""Generate SQL for Text2SQL examples with a model and score it: exact match and execution accuracy.

Prompts are batched (left-padded, with an attention mask) and decoded greedily with the model's KV
cache until the ``EOS`` token; the text up to EOS is the predicted query. Reported per subset
(``seen``: held-out questions over the training schemas; ``held_out``: questions over schemas
never trained on): number of examples, exact match, execution accuracy, and the share of
predictions that execute at all; overall: generated tokens per second and peak memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llmkern.finetune.tokenizer import EOS, PAD, TextTokenizer
from llmkern.finetune.data import Example, prompt
from llmkern.finetune.sqleval import Evaluator
from llmkern.train.memory import PeakMemory, model_tensors


@dataclass
class Prediction:
    example: Example
    sql: str
    exact: bool
    correct: bool
    error: str | None


def generate_sql(model, tokenizer: TextTokenizer, examples: list[Example], device: torch.device, batch_size: int = 32,
                 max_new_tokens: int = 128) -> tuple[list[str], dict]:
    """Greedy SQL for each example (in order) and ``{"generated_tokens", "seconds", "tokens_per_s",
    "peak_memory_bytes"}``.

    Batches are formed from prompts sorted by length, longest first. Peak memory: on CUDA over the
    whole run (allocator statistics); on CPU over the first (longest) batch, measured with
    :class:`llmkern.train.memory.PeakMemory` (a tensor-allocation tracker, too slow to leave on).
    """
    encoded = [tokenizer.encode(prompt(e.schema, e.question), bos=True) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(examples)
    generated = 0
    peak = None
    start = time.perf_counter()
    cuda_peak = PeakMemory(device).__enter__() if device.type == "cuda" else None
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        tracker = PeakMemory(device, model_tensors(model)).__enter__() if cuda_peak is None and b == 0 else None
        out = model.generate(ids, max_new_tokens, eos_token_id=EOS, attention_mask=mask)
        if tracker is not None:
            tracker.__exit__(None, None, None)
            peak = tracker.peak_bytes
        new = out[:, width:].cpu()
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            n = tokens.index(EOS) + 1 if EOS in tokens else len(tokens)
            generated += n
            texts[i] = tokenizer.decode(tokens[:n])
    if cuda_peak is not None:
        cuda_peak.__exit__(None, None, None)
        peak = cuda_peak.peak_bytes
    seconds = time.perf_counter() - start
    return texts, {"generated_tokens": generated, "seconds": round(seconds, 2),
                   "tokens_per_s": round(generated / seconds, 1), "peak_memory_bytes": peak}


def score(examples: list[Example], predictions: list[str], evaluator: Evaluator) -> tuple[dict, list[Prediction]]:
    """Exact match and execution accuracy of ``predictions``, per subset (``seen`` / ``held_out``)."""
    judged = []
    for ex, sql in zip(examples, predictions, strict=True):
        j = evaluator.judge(ex.schema, ex.sql, sql)
        judged.append(Prediction(ex, sql, j.exact, j.correct, j.error))
    subsets = {}
    for name, seen in (("seen", True), ("held_out", False)):
        group = [p for p in judged if p.example.schema_seen == seen]
        if not group:
            continue
        n = len(group)
        subsets[name] = {
            "n": n,
            "exact_match": round(sum(p.exact for p in group) / n, 4),
            "execution_accuracy": round(sum(p.correct for p in group) / n, 4),
            "executes": round(sum(p.error is None for p in group) / n, 4),
            "execution_accuracy_by_lang": {
                lang: round(sum(p.correct for p in group if p.example.lang == lang)
                            / max(1, sum(p.example.lang == lang for p in group)), 4)
                for lang in ("en", "ko")},
        }
    return subsets, judged


def evaluate(model, tokenizer: TextTokenizer, examples: list[Example], evaluator: Evaluator, device: torch.device,
             batch_size: int = 32, max_new_tokens: int = 128) -> tuple[dict, list[Prediction]]:
    """Generate and score: ``({"seen": {...}, "held_out": {...}, "generation": {...}}, predictions)``."""
    texts, generation = generate_sql(model, tokenizer, examples, device, batch_size, max_new_tokens)
    subsets, judged = score(examples, texts, evaluator)
    return {**subsets, "generation": generation}, judged
