"""GIT attention on the CPU through `gitfast._C` (csrc/cpu/attention.cpp): the same signatures as
the Triton kernels' API in `gitfast.kernels`, for CPU tensors.

- ``git_attention(q, k, v, cu_seqlens, num_image_tokens, max_seqlen=None, sm_scale=None)``
- ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None)``
- ``paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
  num_image_tokens, sm_scale=None)``
- ``write_kv_cache(k, v, k_cache, v_cache, slot_mapping)``: new K/V rows into their cache slots
  (negative slots skipped), in place; a decode step's few rows are copied without waking a thread.
- ``available()``: whether the built extension has these ops; ``isa()``: the vector ISA serving
  them ("avx512", "avx2" or "generic"; GITFAST_CPU_ISA caps it, read once per process).

`num_image_tokens` is an int or a tensor (per sequence, or 0-dim for all), clamped per sequence
to its length as in `gitfast.kernels.reference`. fp32, fp16 and bf16 inputs; fp32 arithmetic.
No autograd: these are inference kernels.
"""
from __future__ import annotations

import functools
import importlib

import torch

_OPS = ("git_attention", "paged_decode_attention", "paged_prefill_attention")
_ALL_OPS = (*_OPS, "write_kv_cache")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when gitfast._C is built with the CPU attention ops (their fakes registered then)."""
    try:
        importlib.import_module("gitfast._C")
    except ImportError:
        return False
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"gitfast::{op}", "CPU") for op in _ALL_OPS):
        return False
    _register_fakes()
    return True


def isa() -> str | None:
    """The vector ISA the CPU attention kernels run, or None without them."""
    return torch.ops.gitfast.cpu_isa() if available() else None


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile traces the ops."""
    for op in _OPS:
        torch.library.register_fake(f"gitfast::{op}")(lambda q, *args: q.new_empty(q.shape))
    torch.library.register_fake("gitfast::write_kv_cache")(lambda k, v, k_cache, v_cache, slot_mapping: None)


def _image_counts(num_image_tokens):
    if isinstance(num_image_tokens, torch.Tensor):
        return num_image_tokens, 0
    return None, int(num_image_tokens)


def git_attention(q, k, v, cu_seqlens, num_image_tokens, max_seqlen=None, sm_scale=None):
    """Varlen GIT attention over packed q, k, v `[N, H, D]`; `max_seqlen` is accepted for the Triton
    API's sake and unused (the CPU kernel reads the lengths)."""
    counts, n = _image_counts(num_image_tokens)
    return torch.ops.gitfast.git_attention(q, k, v, cu_seqlens, counts, n, sm_scale)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None, **_ignored):
    """One query per sequence `[B, H, D]` over its `context_lens[b]` cached tokens (none: zeros);
    Triton tuning keywords (num_splits, ...) are accepted and ignored."""
    return torch.ops.gitfast.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, num_image_tokens,
                            sm_scale=None, **_ignored):
    """New tokens (packed by `cu_seqlens_q`) at the end of each sequence's cached context, with
    GIT's mask; Triton tuning keywords (max_seqlen_q, ...) are accepted and ignored."""
    counts, n = _image_counts(num_image_tokens)
    return torch.ops.gitfast.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                     context_lens, counts, n, sm_scale)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """Stores `k`, `v` [N, H, D] at `slot_mapping` [N] (block * block_size + offset; negative =
    skipped) of the contiguous caches [num_blocks, block_size, H, D], in place."""
    torch.ops.gitfast.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


# Load now rather than on the first call: that call may be inside torch.compile's tracing, which
# cannot import modules.
available()
