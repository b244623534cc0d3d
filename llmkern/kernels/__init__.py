"""``@triton.jit`` kernels only, one module per op family; launchers live in llmkern.backends.triton."""
