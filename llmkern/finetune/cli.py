"""``llmkern finetune``: QLoRA-tune the shipped base LM for Text2SQL and show the before/after table."""
from __future__ import annotations

import argparse
import sys

import torch

from llmkern.finetune.config import FinetuneConfig

_DEFAULTS = FinetuneConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--rank", type=int, default=_DEFAULTS.rank, help="LoRA rank r (default %(default)s; alpha = 2r)")
    parser.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=_DEFAULTS.quantize,
                        help="NF4-quantize the frozen base weights (QLoRA); --no-quantize keeps them dense (LoRA)")
    parser.add_argument("--out", default=_DEFAULTS.out, help="output directory (default %(default)s)")
    parser.add_argument("--device", default=_DEFAULTS.device, help="auto (CUDA if available), cpu or cuda[:N]")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out from its last checkpoint instead of starting over")
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=_DEFAULTS.micro_batch_size)
    parser.add_argument("--grad-accum-steps", type=int, default=_DEFAULTS.grad_accum_steps)
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--base", default=None, help="base model directory (default: the checkpoint shipped with llmkern)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, one per core); on a machine busy with "
                             "other work, --threads 1 avoids OpenMP threads waiting on each other")


def run(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(out=args.out, steps=args.steps, rank=args.rank, quantize=args.quantize, device=args.device,
                         resume=args.resume, lr=args.lr, micro_batch_size=args.micro_batch_size,
                         grad_accum_steps=args.grad_accum_steps, seed=args.seed, base=args.base)
    from llmkern.finetune import pipeline  # heavy: models, qlora, train

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"llmkern finetune: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        pipeline.run(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun with --resume --out {args.out} to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0

