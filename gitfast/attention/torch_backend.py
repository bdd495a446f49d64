"""The plain-torch attention backend: serves every operation, on any device, with autograd, and alone
computes attention probabilities (`probabilities`, for word maps and `output_attentions`).

Dense attention is SDPA under GIT's mask (`gitfast.kernels.reference.git_mask`); the paged operations
gather each sequence's keys and values through its block table, vectorised over the batch (the
per-sequence references in `gitfast.kernels.reference` stay the tests' ground truth).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.reference import git_mask, git_visible


def _sdpa(q, k, v, mask=None):
    # [B, T, H, D] -> SDPA's [B, H, T, D] and back
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _gather_padded(pool, block_tables, length: int):
    """Tokens 0..length-1 of every sequence through its block table: [B, length, H, D]."""
    bs = pool.shape[1]
    pos = torch.arange(length, device=pool.device)
    return pool[block_tables[:, pos // bs].long(), pos % bs]


def probabilities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """`q` `[B, H, Tq, D]`, `k`/`v` `[B, H, S, D]`, boolean `mask` (None: all visible) -> (output
    `[B, H, Tq, D]`, probabilities `[B, H, Tq, S]`), as transformers' eager GIT attention computes them."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v), probs


class TorchBackend:
    """`interface.AttentionBackend` in plain torch."""

    name = "torch"

    def serves(self, op: str, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> bool:
        return True

    def dense(self, q, k, v, num_image: Optional[int] = None, text_mask: Optional[torch.Tensor] = None):
        if num_image is None:  # the vision encoder: no mask (SDPA's unmasked path)
            return _sdpa(q, k, v)
        t = q.shape[1]
        return _sdpa(q, k, v, git_mask(num_image, t, t, text_mask, q.device))

    def decode(self, q, k_pool, v_pool, meta):
        lens, longest = meta.context_lens, meta.max_context
        k = _gather_padded(k_pool, meta.block_tables, longest)
        v = _gather_padded(v_pool, meta.block_tables, longest)
        mask = torch.arange(longest, device=q.device)[None, :] < lens[:, None]
        return _sdpa(q[:, None], k, v, mask[:, None, None, :])[:, 0]

    def prefill(self, q, k_pool, v_pool, meta):
        tables, cu, lens, max_q = meta.block_tables, meta.cu_seqlens_q, meta.context_lens, meta.max_q
        b = tables.shape[0]
        n_q = cu[1:] - cu[:-1]
        # scatter packed queries into [B, max_q] (row-aligned to the end of each sequence's context)
        row = torch.repeat_interleave(torch.arange(b, device=q.device), n_q)
        col = torch.arange(q.shape[0], device=q.device) - cu[:-1].long()[row]
        dense = q.new_zeros(b, max_q, *q.shape[1:])
        dense[row, col] = q
        k = _gather_padded(k_pool, tables, meta.max_context)
        v = _gather_padded(v_pool, tables, meta.max_context)
        q_pos = (lens - n_q)[:, None] + torch.arange(max_q, device=q.device)[None, :]  # [B, max_q]
        j = torch.arange(meta.max_context, device=q.device)
        mask = git_visible(q_pos[:, :, None], j, meta.num_image) & (j < lens[:, None, None])  # [B, max_q, max_context]
        return _sdpa(dense, k, v, mask[:, None])[row, col]

    def write_kv(self, k, v, k_pool, v_pool, slot_mapping) -> None:
        bs = k_pool.shape[1]
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        k_pool[slot_mapping // bs, slot_mapping % bs] = k
        v_pool[slot_mapping // bs, slot_mapping % bs] = v


BACKEND = TorchBackend()
