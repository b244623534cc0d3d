"""The measuring tools behind the ``llmkern`` command: ``check`` (numerics against the reference),
``bench`` (benchmark summary), ``kernels`` (static report of the compiled Triton kernels).

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; the numerics rule
they share lives in :mod:`llmkern.tools.numerics`.
"""
