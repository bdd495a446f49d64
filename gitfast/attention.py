"""Attention for the model, by phase, each picking the Triton kernel on CUDA or plain torch otherwise.

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

log = logging.getLogger(__name__)

KERNEL_HEAD_DIMS = (32, 64, 80, 128)


@functools.lru_cache(maxsize=None)
def _kernels():
    """`gitfast.kernels` when its Triton kernels can run on the GPU, else None (plain torch is used)."""
    if not torch.cuda.is_available():
        return None
    try:
        from . import kernels
        if kernels.triton_available():
            return kernels
    except Exception as exc:  # a broken Triton install must not break the model: fall back, say why once
        log.warning("gitfast: Triton kernels unavailable (%s); using PyTorch attention", exc)
    return None


def _use_kernels(q: torch.Tensor) -> Optional[object]:
    if not q.is_cuda or q.requires_grad or q.shape[-1] not in KERNEL_HEAD_DIMS:
        return None
    return _kernels()


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
    """Vision encoder attention: every token sees every token of its image."""
    kern = _use_kernels(q)
    if kern is not None:
        return _packed(kern, q, k, v, q.shape[1])
    return _sdpa(q, k, v)


def git_mask(num_image: int, text_mask: Optional[torch.Tensor], total: int, device) -> torch.Tensor:
    """Boolean mask [B or 1, 1, total, total] (True = may attend) over `[image | text]` tokens."""
    idx = torch.arange(total, device=device)
    allowed = (idx[None, :] <= idx[:, None]) | (idx[None, :] < num_image)  # causal, and everyone sees the image
    allowed &= (idx[:, None] >= num_image) | (idx[None, :] < num_image)   # image queries see only the image
    allowed = allowed[None, None]
    if text_mask is not None:
        keys = torch.cat([text_mask.new_ones(text_mask.shape[0], num_image), text_mask], dim=1).bool()
        allowed = allowed & keys[:, None, None, :]
        # A left-padding query would otherwise still see the image: harmless, its output is never used.
    return allowed


def prefill(q, k, v, num_image: int, text_mask: Optional[torch.Tensor] = None):
    """Decoder attention over whole `[image | text]` sequences (no cache to read)."""
    unpadded = text_mask is None or bool(text_mask.all())
    if unpadded:
        kern = _use_kernels(q)
        if kern is not None:
            return _packed(kern, q, k, v, num_image)
    return _sdpa(q, k, v, git_mask(num_image, None if unpadded else text_mask, q.shape[1], q.device))


def cached(q, k_cache, v_cache, length: int, key_mask: Optional[torch.Tensor]):
    """New text tokens `q` [B, T, H, D], already written at `length - T ..`, attending to cache[:, :length].

    Text queries see all cached tokens but later new ones (causal among the T new tokens) and no
    masked key. `key_mask` [B, length] bool or None.
    """
    t = q.shape[1]
    k, v = k_cache[:, :length], v_cache[:, :length]
    mask = None
    if t > 1:
        pos = torch.arange(length, device=q.device)
        mask = (pos[None, :] <= pos[length - t:, None])[None, None]
    if key_mask is not None:
        km = key_mask[:, None, None, :length]
        mask = km if mask is None else mask & km
    return _sdpa(q, k, v, mask)
