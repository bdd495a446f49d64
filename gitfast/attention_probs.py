"""GIT's decoder attention written out in plain torch, probabilities included.

The fused kernels return only attention outputs; the drop-in's `output_attentions`, its forward over a
`DynamicCache`, and attention maps need the probabilities themselves: softmax(QK^T / sqrt(d)) under GIT's
mask, shapes `[B, heads, queries, keys]`. Only called when asked for; the fast path never comes here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def git_mask(num_image: int, queries: int, keys: int, text_mask: Optional[torch.Tensor] = None,
             device=None) -> torch.Tensor:
    """Boolean mask `[B or 1, 1, queries, keys]` (True = may attend) for the last `queries` of `keys`
    tokens laid out `[image | text]`: image tokens see the image only, text sees the image and earlier
    text. `text_mask` `[B, keys - num_image]` (0 = padding) hides padded text keys."""
    k = torch.arange(keys, device=device)
    q = k[keys - queries:, None]
    allowed = torch.where(q < num_image, k[None, :] < num_image, (k[None, :] <= q) | (k[None, :] < num_image))
    allowed = allowed[None, None]
    if text_mask is not None:
        image = text_mask.new_ones(text_mask.shape[0], num_image)
        allowed = allowed & torch.cat([image, text_mask], dim=1).bool()[:, None, None, :]
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """`q` `[B, H, Tq, D]`, `k`/`v` `[B, H, S, D]`, boolean `mask` -> (output `[B, H, Tq, D]`,
    probabilities `[B, H, Tq, S]`), as transformers' eager GIT attention computes them."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v), probs
