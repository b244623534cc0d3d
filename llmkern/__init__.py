"""llmkern: Triton (GPU) and C++ (CPU) kernels for training and fine-tuning LLMs.

Every op has a pure-PyTorch reference (``llmkern.reference``) and runs on the backend chosen by
``LLMKERN_BACKEND`` / :func:`use_backend` (see :mod:`llmkern.backends`).
"""
from llmkern.backends import current_backend, use_backend
from llmkern._info import info
from llmkern.quant_state import QuantState
from llmkern import nn, ops
from llmkern.patch import swap_modules

__version__ = "0.1.0"

__all__ = ["__version__", "QuantState", "current_backend", "info", "nn", "ops", "swap_modules", "use_backend"]
