"""The Triton attention backend: gitfast.kernels' kernels (`gitfast.kernels.api`) for CUDA tensors,
when Triton imports and can run them. A broken Triton install falls back to plain torch (said once).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from .interface import DECODE, DENSE, KERNEL_HEAD_DIMS, PREFILL, VISION, WRITE_KV, packed_dense

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def kernels():
    """`gitfast.kernels.api` when its Triton kernels can run on the GPU, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from ..kernels import api
        if api.triton_available():
            return api
    except Exception as exc:  # a broken Triton install must not break the model: fall back, say why once
        log.warning("gitfast: Triton kernels unavailable (%s); using PyTorch attention", exc)
    return None


class TritonBackend:
    """`interface.AttentionBackend` over gitfast.kernels (CUDA tensors)."""

    name = "triton"

    def serves(self, op: str, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> bool:
        if op == WRITE_KV:
            return True
        return op in (VISION, DENSE, PREFILL, DECODE) and x.shape[-1] in KERNEL_HEAD_DIMS

    def dense(self, q, k, v, num_image: Optional[int] = None, text_mask: Optional[torch.Tensor] = None):
        return packed_dense(kernels().git_attention, q, k, v, num_image)

    def decode(self, q, k_pool, v_pool, meta):
        return kernels().paged_decode_attention(q, k_pool, v_pool, meta.block_tables, meta.context_lens,
                                                max_context_len=meta.max_context)  # a host bound: no GPU sync

    def prefill(self, q, k_pool, v_pool, meta):
        return kernels().paged_prefill_attention(q, k_pool, v_pool, meta.block_tables, meta.cu_seqlens_q,
                                                 meta.context_lens, meta.num_image, max_seqlen_q=meta.max_q)

    def write_kv(self, k, v, k_pool, v_pool, slot_mapping) -> None:
        kernels().write_kv_cache(k, v, k_pool, v_pool, slot_mapping)


BACKEND = TritonBackend()
