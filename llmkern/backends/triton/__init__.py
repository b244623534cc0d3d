"""The Triton backend: launchers (allocation, grids, strides) for the kernels of llmkern.kernels.

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before llmkern was imported.
"""
