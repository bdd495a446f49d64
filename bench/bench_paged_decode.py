"""One decode step of attention over the paged KV cache (one new token per sequence).

Providers: `gitfast` (Triton `paged_decode_attention`, split-K chosen from shapes), `gitfast_graph`
(splits planned for a CUDA graph's bound, 1,248 tokens, whatever the context), `gitfast_nosplit`
(the same kernel forced to one pass, to show what split-K buys at small batch), `sdpa` (SDPA over
K/V already contiguous `[B, H, L, D]`: no gather, a strong baseline). Bytes are the K/V a step must
read (q and out are negligible), so TB/s compares directly with the device's copy bandwidth.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .common import Case, triton_skip_reason
from .timing import copies_for, rotating

SUITE = "paged_decode"
HEADS, HEAD_DIM, BLOCK_SIZE = 12, 64, 16          # GIT decoder; a vLLM-style 16-token page

FULL_CONTEXTS = [217, 500, 901, 1200]             # git-base caption, longer prompts, VQA prefix
FULL_BATCHES = [1, 8, 64, 256, 512]
QUICK = [(2, 37)]                                  # (batch, context)
GRAPH_BOUND = 1248                                 # a CUDA-graph decode's table width x block size



def _paged_inputs(batch: int, context: int, device: str, dtype: torch.dtype):
    """A pool holding every sequence's blocks in shuffled order, as a long-running cache would."""
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device).view(batch, per_seq).to(torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=dtype)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    return q, k_cache, v_cache, tables, lens


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    dt = str(dtype).replace("torch.", "")
    grid = QUICK if quick else [(b, c) for c in FULL_CONTEXTS for b in FULL_BATCHES]
    skip = triton_skip_reason(device)
    for batch, context in grid:
        shape = {"batch": batch, "context": context, "heads": HEADS, "head_dim": HEAD_DIM,
                 "block_size": BLOCK_SIZE}
        label = f"B{batch} ctx{context}"
        kv_bytes = 2.0 * batch * context * HEADS * HEAD_DIM * elt
        flops = 4.0 * batch * HEADS * context * HEAD_DIM
        n_sets = copies_for(kv_bytes, device)

        def case(provider, fn, reason=None):
            return Case(SUITE, shape, provider, dt, fn if reason is None else None, flops=flops,
                        bytes=kv_bytes, skip_reason=reason, label=label)

        if skip is None:
            from gitfast.kernels.api import paged_decode_attention

            paged = rotating(lambda: _paged_inputs(batch, context, device, dtype), n_sets)

            def run(paged=paged, context=context):
                return paged_decode_attention(*paged.next(), max_context_len=context)

            def run_graph(paged=paged):
                return paged_decode_attention(*paged.next(), max_context_len=GRAPH_BOUND)

            def run_nosplit(paged=paged):
                return paged_decode_attention(*paged.next(), num_splits=1)
            yield case("gitfast", run)
            yield case("gitfast_graph", run_graph)
            yield case("gitfast_nosplit", run_nosplit)
        else:
            yield case("gitfast", None, skip)
            yield case("gitfast_graph", None, skip)
            yield case("gitfast_nosplit", None, skip)

        def make_dense(batch=batch, context=context):
            q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
            k = torch.randn(batch, HEADS, context, HEAD_DIM, device=device, dtype=dtype)
            return q, k, torch.randn_like(k)
        dense = rotating(make_dense, n_sets)

        def run_sdpa(dense=dense):
            return F.scaled_dot_product_attention(*dense.next())
        yield case("sdpa", run_sdpa)
