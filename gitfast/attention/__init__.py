"""GIT's attention: what the model and the serving wing call, by phase, each call run by the backend
that `selection.backend_for` picks (`interface.AttentionBackend`: Triton on CUDA, the extension's C++
kernels on the CPU, plain torch where neither serves: autograd, an unbuilt extension, odd head sizes).

The package owns the contract with the serving wing (`interface.AttentionMetadata`), the backends (one
file each: `torch_backend`, `cpu_backend`, `triton_backend`) and the choice among them. GIT's mask
(`git_mask`) and the reference every backend is tested against are `gitfast.kernels.reference`'s.
Layouts are token-major, `[batch, tokens, heads, head_dim]`, like the KV cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.reference import git_mask  # noqa: F401  (the one mask, for callers of probabilities)
from .interface import (DECODE, DENSE, DENSE_PADDED, PREFILL, PREFIX, VISION, WRITE_KV,  # noqa: F401
                        AttentionMetadata)
from .selection import backend_for
from .torch_backend import BACKEND as plain_torch  # noqa: F401  (for callers that need plain torch's numbers)
from .torch_backend import probabilities  # noqa: F401  (plain torch alone computes them)


def bidirectional(q, k, v):
    """Vision encoder attention `[B, T, H, D]`: every token sees every token of its image."""
    return backend_for(VISION, q).dense(q, k, v)


def prefill(q, k, v, num_image: int, text_mask: Optional[torch.Tensor] = None):
    """Decoder attention over whole `[image | text]` sequences (no cache to read); `text_mask`
    `[B, text tokens]`, 0 = padding."""
    padded = text_mask is not None and not bool(text_mask.all())
    return backend_for(DENSE_PADDED if padded else DENSE, q).dense(q, k, v, num_image, text_mask if padded else None)


def paged(q, k, v, k_pool, v_pool, meta: AttentionMetadata):
    """Writes the new K/V at `meta.slot_mapping`, then attends as `meta.phase` says. Layouts: prefix
    `[n, I, H, D]`; prefill packed `[N, H, D]`; decode `[B, H, D]`."""
    write_kv(k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:]), k_pool, v_pool, meta.slot_mapping)
    if meta.phase == PREFIX:
        return bidirectional(q, k, v)
    backend = backend_for(meta.phase, q)
    if meta.phase == DECODE:
        return backend.decode(q, k_pool, v_pool, meta)
    return backend.prefill(q, k_pool, v_pool, meta)


def write_kv(k, v, k_pool, v_pool, slot_mapping):
    """Stores new K/V `[N, H, D]` at `slot_mapping` (block * block_size + offset; negative = skip)."""
    backend_for(WRITE_KV, k, v, cache=k_pool).write_kv(k, v, k_pool, v_pool, slot_mapping)
