"""Packaging: the Python package plus the C++ sources of csrc/, shipped as package data `llmkern._csrc`.

The CPU kernels are compiled on first use (torch.utils.cpp_extension.load with ninja) and cached,
so installing needs no compiler; see llmkern/backends/cpu/__init__.py.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["llmkern", "llmkern.*"]) + ["llmkern._csrc"],
    package_dir={"llmkern._csrc": "csrc"},
    package_data={"llmkern._csrc": ["*.cpp", "*.h"]},
)
