"""The script that makes the small base LM shipped in ``llmkern/finetune/base/``.

The base model is a Llama-style llmkern :class:`~llmkern.models.Transformer` over the byte-level
vocabulary, pretrained from scratch with :class:`~llmkern.train.Trainer` on *unpaired* in-domain
text drawn from the training split only: each training query written under its schema
(``tables: ...\\nsql: SELECT ...``) and each training question on its own (``question: ...``).
It thus knows the schemas, SQL and the questions' languages, but has never seen a question followed
by its SQL; learning that mapping is the fine-tuning's job. No validation or test pair, and nothing
from the held-out schemas, is in the corpus.

    python -m llmkern.finetune.pretrain --out llmkern/finetune/base

writes ``config.json`` + ``model.safetensors`` (fp32, under 5 MB) and ``pretrain.json`` (how it
was made: corpus size, steps, seed, final loss, time).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from llmkern.finetune import data, tokenizer
from llmkern.finetune.schemas import TRAIN_SCHEMAS
from llmkern.models import Transformer, TransformerConfig
from llmkern.train import TrainConfig, Trainer

BASE_DIR = Path(__file__).parent / "base"


def base_config() -> TransformerConfig:
    """The shipped base model's shape: 4 layers of width 128 (about 0.9M parameters)."""
    return TransformerConfig(vocab_size=tokenizer.VOCAB_SIZE, dim=128, n_layers=4, n_heads=4, max_seq_len=512)


def corpus(dataset: data.Dataset, extra_draws: int = 4000, seed: int = 0) -> list[str]:
    """The pretraining documents, deduplicated and sorted: each query written under its schema
    (``tables: ...\nsql: ...``), and each question with its translation (``en: ...\nko: ...``:
    English/Korean parallel text, as web corpora hold; it also teaches copying names and numbers
    from one sentence to the next). No document holds a question together with its SQL.

    The queries and questions are those of the training split plus ``extra_draws`` fresh draws
    per training schema (an independent random stream), minus every draw whose query is in the
    validation or test split: no held-out query, question or schema is in the corpus.
    """
    held = {(e.schema, e.sql) for e in dataset.valid + dataset.test}
    draws: dict[tuple[str, str], dict[str, set[str]]] = {}
    examples = list(dataset.train)
    for name in TRAIN_SCHEMAS:
        examples += data.generate(data.get_schema(name), dataset.rows[name], extra_draws, seed, stream="pretraining")
    for ex in examples:
        if (ex.schema, ex.sql) not in held:
            draws.setdefault((ex.schema, ex.sql), {"en": set(), "ko": set()})[ex.lang].add(ex.question)
    docs = set()
    for (schema, sql), by_lang in draws.items():
        docs.add(f"tables: {data.schema_text(data.get_schema(schema))}\nsql: {sql}")
        en, ko = sorted(by_lang["en"]), sorted(by_lang["ko"])
        for i in range(max(len(en), len(ko))):
            if en and ko:
                docs.add(f"en: {en[i % len(en)]}\nko: {ko[i % len(ko)]}")
            else:
                docs.add(f"{'en' if en else 'ko'}: {(en or ko)[i]}")
    return sorted(docs)


def pack(docs: list[str], block_size: int, n_blocks: int, seed: int) -> list[dict[str, list[int]]]:
    """``n_blocks`` blocks of ``block_size`` tokens: the documents, each as BOS + bytes + EOS, in
    seeded random order (repeated as needed), concatenated and cut. Labels are the inputs."""
    rng = random.Random(seed)
    stream: list[int] = []
    order: list[str] = []
    while len(stream) < block_size * n_blocks:
        if not order:
            order = docs[:]
            rng.shuffle(order)
        stream += tokenizer.encode(order.pop(), bos=True, eos=True)
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]
    return [{"input_ids": b, "labels": b} for b in blocks]


def pretrain(out: str | Path, steps: int = 600, batch_size: int = 16, block_size: int = 256, lr: float = 3e-3,
             seed: int = 0, device: str = "cpu", progress: bool = True) -> Transformer:
    """Pretrain the base model on :func:`corpus` of the seeded training split and save it to ``out``."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        dataset = data.build_dataset(Path(work) / "databases", seed=seed)
        docs = corpus(dataset, seed=seed)
        blocks = pack(docs, block_size, steps * batch_size, seed)
        torch.manual_seed(seed)
        model = Transformer(base_config())
        config = TrainConfig(output_dir=str(Path(work) / "run"), max_steps=steps, micro_batch_size=batch_size,
                             lr=lr, warmup_steps=min(50, steps), weight_decay=0.01, adam_betas=(0.9, 0.95),
                             seed=seed, progress=progress, log_every=10)
        result = Trainer(model.to(device), config, blocks).train()
    model = model.cpu()
    out = Path(out)
    model.save_pretrained(out)
    info = {"documents": len(docs), "training_pairs_used": len(dataset.train), "steps": steps,
            "batch_size": batch_size, "block_size": block_size, "lr": lr, "seed": seed,
            "parameters": model.num_parameters(), "final_loss": result["loss"],
            "time_s": round(time.perf_counter() - start, 1), "device": device, "torch": torch.__version__}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmkern.finetune.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BASE_DIR), help="where to write the checkpoint (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    pretrain(args.out, args.steps, args.batch_size, args.block_size, args.lr, args.seed, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
