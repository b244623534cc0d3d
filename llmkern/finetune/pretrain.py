"""The script that makes the small base LM shipped in ``llmkern/finetune/base/``.

The base model is a Llama-style llmkern :class:`~llmkern.models.Transformer`, pretrained from
scratch with :class:`~llmkern.train.Trainer` on in-domain text drawn from the training schemas only
(see :func:`corpus`): SQL written under its schema, English/Korean parallel questions, and SQL files
whose queries carry a comment saying what they do. It thus knows the schemas, SQL, both languages
and how a request reads next to a query, but has never seen the Text2SQL prompt
(``tables: ...\nquestion: ...\nsql: ``); following that prompt is the fine-tuning's job. No
validation or test query or question, and nothing from the held-out schemas, is in the corpus.
The byte-level BPE tokenizer (:mod:`llmkern.finetune.tokenizer`) is trained on the same corpus.

    python -m llmkern.finetune.pretrain --out llmkern/finetune/base

writes ``tokenizer.json``, ``config.json`` + ``model.safetensors`` (fp32, under 5 MB) and
``pretrain.json`` (how it was made: corpus size, steps, seed, final loss, time).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from llmkern.finetune import data
from llmkern.finetune.schemas import TRAIN_SCHEMAS, Schema
from llmkern.finetune.tokenizer import TextTokenizer
from llmkern.models import Transformer, TransformerConfig
from llmkern.train import TrainConfig, Trainer

BASE_DIR = Path(__file__).parent / "base"


VOCAB_SIZE = 1024


def base_config(vocab_size: int = VOCAB_SIZE) -> TransformerConfig:
    """The shipped base model's shape: 4 layers of width 128 (1.1M parameters with the 1024-token vocabulary)."""
    return TransformerConfig(vocab_size=vocab_size, dim=128, n_layers=4, n_heads=4, max_seq_len=512)


def corpus(dataset: data.Dataset, extra_draws: int = 4000, seed: int = 0, queries_per_file: int = 3) -> list[str]:
    """The pretraining documents, deduplicated and sorted, of three kinds:

    * a query written under its schema (``tables: ...\nsql: SELECT ...``);
    * a question with its translation (``en: ...\nko: ...``: English/Korean parallel text, as web
      corpora hold; it also teaches copying names and numbers from one sentence to the next);
    * SQL "files": ``queries_per_file`` queries, each under a comment that says what it does
      (``-- How many ...?\nSELECT ...;``), as code corpora hold. So the base model has seen
      questions next to SQL, but never the Text2SQL prompt (tables + ``question:`` + ``sql:``).

    Queries and questions come from the training split plus ``extra_draws`` fresh draws per
    training schema (an independent random stream), and as many again over copies of the tables
    whose text values are invented words (``... whose city is Vokaru`` / ``city = 'Vokaru'``): a
    name the model cannot recall from the database must be copied from the request, which teaches
    copying rather than guessing a likely value. The SQL files use the fresh draws only. Every draw
    whose query is in the validation or test split is left out: no held-out query, question or
    schema is in the corpus.
    """
    held = {(e.schema, e.sql) for e in dataset.valid + dataset.test}
    fresh = []
    for name in TRAIN_SCHEMAS:
        schema = data.get_schema(name)
        invented = _invented_values(schema, dataset.rows[name], random.Random(f"{seed}:{name}:invented"))
        fresh += data.generate(schema, dataset.rows[name], extra_draws, seed, stream="pretraining")
        fresh += data.generate(schema, invented, extra_draws, seed, stream="pretraining-invented")
    fresh = [e for e in fresh if (e.schema, e.sql) not in held]
    draws: dict[tuple[str, str], dict[str, set[str]]] = {}
    for ex in dataset.train + fresh:
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
    rng = random.Random(f"{seed}:sql-files")
    commented = sorted({(e.question, e.sql) for e in fresh})
    rng.shuffle(commented)
    for i in range(0, len(commented), queries_per_file):
        docs.add("\n".join(f"-- {q}\n{sql};" for q, sql in commented[i:i + queries_per_file]))
    return sorted(docs)


def _invented_values(schema: Schema, rows: dict[str, list[tuple]], rng: random.Random) -> dict[str, list[tuple]]:
    """``rows`` with every text value replaced by one or two invented capitalised words."""
    def word() -> str:
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))).title()

    out = {}
    for table in schema.tables:
        text = [c.type == "TEXT" for c in table.columns]
        out[table.name] = [tuple(" ".join(word() for _ in range(rng.randint(1, 2))) if is_text else v
                                 for v, is_text in zip(row, text)) for row in rows[table.name]]
    return out


def pack(docs: list[str], tokenizer: TextTokenizer, block_size: int, n_blocks: int,
         seed: int) -> list[dict[str, list[int]]]:
    """``n_blocks`` blocks of ``block_size`` tokens: the documents, each as BOS + text + EOS, in
    seeded random order (repeated as needed), concatenated and cut. Labels are the inputs."""
    rng = random.Random(seed)
    encoded = {doc: tokenizer.encode(doc, bos=True, eos=True) for doc in docs}
    stream: list[int] = []
    order: list[str] = []
    while len(stream) < block_size * n_blocks:
        if not order:
            order = docs[:]
            rng.shuffle(order)
        stream += encoded[order.pop()]
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]
    return [{"input_ids": b, "labels": b} for b in blocks]


def pretrain(out: str | Path, steps: int = 4000, batch_size: int = 16, block_size: int = 256, lr: float = 3e-3,
             seed: int = 0, device: str = "cpu", progress: bool = True) -> Transformer:
    """Pretrain the base model on :func:`corpus` of the seeded training split and save it to ``out``."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        dataset = data.build_dataset(Path(work) / "databases", seed=seed)
        docs = corpus(dataset, seed=seed)
        tokenizer = TextTokenizer.train(docs, VOCAB_SIZE)
        blocks = pack(docs, tokenizer, block_size, steps * batch_size, seed)
        torch.manual_seed(seed)
        model = Transformer(base_config(tokenizer.vocab_size))
        config = TrainConfig(output_dir=str(Path(work) / "run"), max_steps=steps, micro_batch_size=batch_size,
                             lr=lr, warmup_steps=min(50, steps), weight_decay=0.01, adam_betas=(0.9, 0.95),
                             seed=seed, progress=progress, log_every=10)
        result = Trainer(model.to(device), config, blocks).train()
    model = model.cpu()
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save(out)
    info = {"documents": len(docs), "training_pairs_used": len(dataset.train), "steps": steps,
            "batch_size": batch_size, "block_size": block_size, "lr": lr, "seed": seed,
            "parameters": model.num_parameters(), "final_loss": result["loss"],
            "time_s": round(time.perf_counter() - start, 1), "device": device, "torch": torch.__version__}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmkern.finetune.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BASE_DIR), help="where to write the checkpoint (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=4000)
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
