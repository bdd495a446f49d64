"""GIT's decoder attention written out in plain torch, probabilities included.

The fused kernels return only attention outputs; the drop-in's `output_attentions`, its forward over a
`DynamicCache`, and attention maps need the probabilities themselves: softmax(QK^T / sqrt(d)) under GIT's
mask (`attention.git_mask`), shapes `[B, heads, queries, keys]`. Only called when asked for; the fast
path never comes here.
"""
from __future__ import annotations

import math

import torch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """`q` `[B, H, Tq, D]`, `k`/`v` `[B, H, S, D]`, boolean `mask` -> (output `[B, H, Tq, D]`,
    probabilities `[B, H, Tq, S]`), as transformers' eager GIT attention computes them."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v), probs
