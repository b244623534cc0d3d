"""Pure-PyTorch references: the specification of every llmkern op and the last-resort backend.

Each module mirrors an op family (``norm``, ``nf4``, ``attention``, ``lora``). References compute in
fp32 (or the input's precision when that is higher) and are written to be obviously right rather
than fast; tests compare every kernel against them.
"""
