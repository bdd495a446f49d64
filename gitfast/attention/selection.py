"""The one place an attention backend is chosen (`backend_for`), for every operation of
`interface.OPS`: the device's kernels when they serve the operation for these inputs, else plain torch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .torch_backend import BACKEND as PLAIN_TORCH
from .interface import AttentionBackend


@functools.lru_cache(maxsize=None)
def _kernels_on(device_type: str) -> Optional[AttentionBackend]:
    """The kernel backend for a device type, when it can run here: Triton on CUDA, gitfast._C's C++
    kernels on the CPU (their vector ISA measured now, once per process), else None."""
    if device_type == "cuda":
        from .triton_backend import BACKEND, kernels

        return BACKEND if kernels() is not None else None
    if device_type == "cpu":
        from .cpu_backend import BACKEND, available, decision

        if not available():
            return None
        decision()
        return BACKEND
    return None


def backend_for(op: str, *inputs: torch.Tensor, cache: Optional[torch.Tensor] = None) -> AttentionBackend:
    """The backend that runs `op` on `inputs` (the first decides the device; `cache`: the KV pool
    written by WRITE_KV). Kernels have no backward: inputs that need grad take plain torch."""
    x = inputs[0]
    if not any(t.requires_grad for t in inputs):
        kernels = _kernels_on(x.device.type)
        if kernels is not None and kernels.serves(op, x, cache):
            return kernels
    return PLAIN_TORCH
