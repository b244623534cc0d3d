"""The ``llmkern`` command line: ``llmkern <command> [options]``; ``llmkern <command> --help`` for each.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("llmkern._info", "print versions, device and the backend each op resolves to"),
    "check": ("llmkern.tools.check", "check every op, forward and backward, against the reference (exit 1 on a FAIL)"),
    "bench": ("llmkern.tools.bench", "run the benchmarks of bench/ and print llmkern's speedup over each peer"),
    "kernels": ("llmkern.tools.kernels", "compile every Triton kernel for sm_80/sm_90 (no GPU needed): registers, spills, smem"),
    "finetune": ("llmkern.finetune.cli", "QLoRA-tune the shipped small LM for Text2SQL; before/after exact match and execution accuracy"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmkern", description="llmkern: kernels for LLM training and fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
