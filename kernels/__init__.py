"""gitfast's Triton kernels, installed as ``gitfast.kernels``.

This folder is also importable as a top-level ``kernels`` from the repository root (the name of a
Hugging Face package that transformers probes), so importing it must never raise: only relative
imports here, and Triton itself is imported lazily by the kernel modules.
"""
