"""Text2SQL fine-tuning, the workload ``llmkern finetune`` runs end to end.

``data`` / ``schemas``: the seeded SQLite databases and question/SQL pairs; ``tokenizer``: a small BPE;
``sqleval``: exact match and sandboxed execution accuracy; ``evaluate``: generation and scoring;
``pretrain``: the script that made the shipped base model (``base/``); ``pipeline``: the
evaluate / QLoRA fine-tune / evaluate workflow; ``report``: its table and loss curve; ``cli``: the command.
"""
