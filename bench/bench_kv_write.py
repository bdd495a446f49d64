"""Writing new K/V into paged-cache slots (bandwidth-bound scatter).

Providers: `gitfast` (Triton `write_kv_cache`), `torch` (index_put on the cache viewed as
`[slots, H, D]` after dropping negative slots with a boolean mask, which costs a device sync),
`torch_nomask` (index_put alone: valid only when no slot is negative, as here). Shapes: a git-base
prefill (B256 x 217 tokens), a decode step (256 tokens) and one token. Bytes are K and V read plus
written once.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .common import Case, triton_skip_reason
from .timing import copies_for, rotating

SUITE = "kv_write"
HEADS, HEAD_DIM, BLOCK_SIZE = 12, 64, 16

FULL = [("prefill B256x217", 256 * 217), ("decode B256", 256), ("decode B1", 1)]
QUICK = [("tokens 37", 37)]



def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    dt = str(dtype).replace("torch.", "")
    skip = triton_skip_reason(device)
    for label, tokens in QUICK if quick else FULL:
        shape = {"tokens": tokens, "heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE}
        moved = 2.0 * 2.0 * tokens * HEADS * HEAD_DIM * elt     # K and V, read + written
        num_slots = -(-2 * tokens // BLOCK_SIZE) * BLOCK_SIZE   # half the pool gets written
        n_sets = copies_for(moved, device)

        def make(tokens=tokens, num_slots=num_slots):
            k = torch.randn(tokens, HEADS, HEAD_DIM, device=device, dtype=dtype)
            v = torch.randn_like(k)
            slots = torch.randperm(num_slots, device=device)[:tokens]
            return k, v, slots
        inputs = rotating(make, n_sets)
        shape_cache = (num_slots // BLOCK_SIZE, BLOCK_SIZE, HEADS, HEAD_DIM)
        k_cache = torch.zeros(shape_cache, device=device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)

        def case(provider, fn, reason=None):
            return Case(SUITE, shape, provider, dt, fn if reason is None else None, bytes=moved,
                        skip_reason=reason, label=label)

        if skip is None:
            from gitfast.kernels.api import write_kv_cache

            def run(inputs=inputs, k_cache=k_cache, v_cache=v_cache):
                k, v, slots = inputs.next()
                write_kv_cache(k, v, k_cache, v_cache, slots)
            yield case("gitfast", run)
        else:
            yield case("gitfast", None, skip)

        def run_torch(inputs=inputs, k_cache=k_cache, v_cache=v_cache):
            k, v, slots = inputs.next()
            keep = slots >= 0
            k_cache.view(-1, HEADS, HEAD_DIM)[slots[keep]] = k[keep]
            v_cache.view(-1, HEADS, HEAD_DIM)[slots[keep]] = v[keep]
        yield case("torch", run_torch)

        def run_torch_nomask(inputs=inputs, k_cache=k_cache, v_cache=v_cache):
            k, v, slots = inputs.next()
            k_cache.view(-1, HEADS, HEAD_DIM)[slots] = k
            v_cache.view(-1, HEADS, HEAD_DIM)[slots] = v
        yield case("torch_nomask", run_torch_nomask)
