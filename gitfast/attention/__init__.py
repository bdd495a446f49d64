"""Attention for the model, by phase: the Triton kernels on CUDA, the extension's C++ kernels on the
CPU, plain torch where neither serves (autograd, an unbuilt extension, odd head sizes).

Layouts are token-major, `[batch, tokens, heads, head_dim]`, like the KV cache. GIT's mask: in each
sequence the first `num_image` tokens attend to each other (bidirectional) and to no text; text
tokens attend to every image token and causally to text; padded text keys are masked out.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.reference import git_mask, git_visible
from .interface import DECODE, KERNEL_HEAD_DIMS, PREFILL, PREFIX, AttentionMetadata  # noqa: F401

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _triton():
    """`gitfast.kernels` when its Triton kernels can run on the GPU, else None (plain torch is used)."""
    if not torch.cuda.is_available():
        return None
    try:
        from ..kernels import api as kernels
        if kernels.triton_available():
            return kernels
    except Exception as exc:  # a broken Triton install must not break the model: fall back, say why once
        log.warning("gitfast: Triton kernels unavailable (%s); using PyTorch attention", exc)
    return None


@functools.lru_cache(maxsize=None)
def _cpu():
    """`gitfast.cpu_attention` (the extension's C++ kernels, same API as the Triton ones) when built."""
    from .. import cpu_attention

    if not cpu_attention.available():
        return None
    cpu_attention.decision()  # the ISA, measured once per process before the first call
    return cpu_attention


def _use_kernels(q: torch.Tensor) -> Optional[object]:
    """The kernels for `q`'s device (Triton on CUDA, C++ on the CPU), or None for plain torch: autograd
    and unsupported head sizes take plain torch."""
    if q.requires_grad or q.shape[-1] not in KERNEL_HEAD_DIMS:
        return None
    return _triton() if q.is_cuda else _cpu() if q.device.type == "cpu" else None


def _sdpa(q, k, v, mask=None):
    # [B, T, H, D] -> SDPA's [B, H, T, D] and back
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _packed(kern, q, k, v, num_image):
    b, t = q.shape[:2]
    cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
    out = kern.git_attention(q.reshape(b * t, *q.shape[2:]), k.reshape(b * t, *k.shape[2:]),
                             v.reshape(b * t, *v.shape[2:]), cu, num_image, max_seqlen=t)
    return out.view(q.shape)


def bidirectional(q, k, v):
    """Vision encoder attention: every token sees every token of its image. On the CPU, SDPA without
    a mask (oneDNN's GEMM path) beats the C++ kernel here (0.6-0.7x at 8 x 197 tokens, 12 heads:
    bench/bench_cpu_attention.py), so only CUDA takes a kernel."""
    kern = _use_kernels(q) if q.is_cuda else None
    if kern is not None:
        return _packed(kern, q, k, v, q.shape[1])
    return _sdpa(q, k, v)


def prefill(q, k, v, num_image: int, text_mask: Optional[torch.Tensor] = None):
    """Decoder attention over whole `[image | text]` sequences (no cache to read)."""
    unpadded = text_mask is None or bool(text_mask.all())
    if unpadded:
        kern = _use_kernels(q)
        if kern is not None:
            return _packed(kern, q, k, v, num_image)
    t = q.shape[1]
    return _sdpa(q, k, v, git_mask(num_image, t, t, None if unpadded else text_mask, q.device))


# --- the paged cache (engine) ---------------------------------------------------------------
# On CUDA these call the Triton kernels; elsewhere a vectorised plain-torch gather through the block
# tables (the per-sequence references in `gitfast.kernels.reference` are the tests' ground truth).

def paged(q, k, v, k_pool, v_pool, meta: AttentionMetadata):
    """Writes the new K/V at `meta.slot_mapping`, then attends as `meta.phase` says. Layouts: prefix
    `[n, I, H, D]`; prefill packed `[N, H, D]`; decode `[B, H, D]`."""
    write_kv(k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:]), k_pool, v_pool, meta.slot_mapping)
    if meta.phase == PREFIX:
        return bidirectional(q, k, v)
    if meta.phase == DECODE:
        return paged_decode(q, k_pool, v_pool, meta.block_tables, meta.context_lens, meta.max_context)
    return paged_prefill(q, k_pool, v_pool, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, meta.num_image,
                         meta.max_q, meta.max_context)

def _gather_padded(pool, block_tables, length: int):
    """Tokens 0..length-1 of every sequence through its block table: [B, length, H, D]."""
    bs = pool.shape[1]
    pos = torch.arange(length, device=pool.device)
    return pool[block_tables[:, pos // bs].long(), pos % bs]


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Stores new K/V `[N, H, D]` at `slot_mapping` (block * block_size + offset; negative = skip)."""
    kern = _triton() if k.is_cuda else _cpu() if k.device.type == "cpu" and k_cache.is_contiguous() else None
    if kern is not None and not (k.requires_grad or v.requires_grad):
        return kern.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    bs = k_cache.shape[1]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache[slot_mapping // bs, slot_mapping % bs] = k
    v_cache[slot_mapping // bs, slot_mapping % bs] = v


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, max_context: int):
    """One text token per sequence `q` [B, H, D] over its `context_lens` cached tokens."""
    kern = _use_kernels(q)
    if kern is not None:
        return kern.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                           max_context_len=max_context)  # a host bound: no GPU sync
    k = _gather_padded(k_cache, block_tables, max_context)
    v = _gather_padded(v_cache, block_tables, max_context)
    mask = torch.arange(max_context, device=q.device)[None, :] < context_lens[:, None]
    return _sdpa(q[:, None], k, v, mask[:, None, None, :])[:, 0]


def paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, num_image: int,
                  max_q: int, max_context: int):
    """New text tokens of each sequence (packed `q` [N, H, D]), already written at the end of its
    `context_lens` tokens: each sees the image prefix and causally its text."""
    kern = _use_kernels(q)
    if kern is not None:
        return kern.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, num_image,
                                            max_seqlen_q=max_q)
    b = block_tables.shape[0]
    n_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    # scatter packed queries into [B, max_q] (row-aligned to the end of each sequence's context)
    row = torch.repeat_interleave(torch.arange(b, device=q.device), n_q)
    col = torch.arange(q.shape[0], device=q.device) - cu_seqlens_q[:-1].long()[row]
    dense = q.new_zeros(b, max_q, *q.shape[1:])
    dense[row, col] = q
    k = _gather_padded(k_cache, block_tables, max_context)
    v = _gather_padded(v_cache, block_tables, max_context)
    q_pos = (context_lens - n_q)[:, None] + torch.arange(max_q, device=q.device)[None, :]  # [B, max_q]
    j = torch.arange(max_context, device=q.device)
    mask = git_visible(q_pos[:, :, None], j, num_image) & (j < context_lens[:, None, None])  # [B, max_q, max_context]
    out = _sdpa(dense, k, v, mask[:, None])
    return out[row, col]
