"""Logits processing: the steps that turn next-token scores into the scores a token is chosen from.

One module for both ways gitfast chooses tokens: transformers' exact loops (`generation.Processor`,
which knows the ids generated so far) and the engine's per-slot selection (`selection.Selector`,
which keeps each slot's state on the device). Each caller says which tokens were seen and which rows
are still too short; the steps and their order are transformers': repetition penalty, min-length EOS
mask, then, when sampling, temperature, top-k and top-p.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens `seen` [B, vocab] become less likely: divided by the penalty when positive, multiplied
    when negative."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def top_k(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Drops the least likely tokens whose total probability stays within 1 - p."""
    ascending, order = torch.sort(scores, descending=False)
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)
    drop[..., -min_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)


def process(scores: torch.Tensor, s, *, seen: Optional[torch.Tensor] = None,
            too_short: Optional[torch.Tensor] = None, eos_mask: Optional[torch.Tensor] = None,
            min_keep: int = 1) -> torch.Tensor:
    """Every step `s` (a `generation.Settings`) asks for, in transformers' order.

    seen: [B, vocab] bool, tokens the repetition penalty applies to (needed when it is active);
    too_short: [B] bool, or a Python bool for all rows: EOS is masked there (min length);
    min_keep: tokens top-k/top-p always keep (beam search needs a non-EOS continuation per beam).
    """
    if s.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen, s.repetition_penalty)
    if isinstance(too_short, torch.Tensor):
        scores = scores.masked_fill(too_short[:, None] & eos_mask[None, :], -math.inf)
    elif too_short:
        scores = scores.masked_fill(eos_mask, -math.inf)
    if s.do_sample:
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k:
            scores = top_k(scores, s.top_k, min_keep)
        if s.top_p < 1.0:
            scores = top_p(scores, s.top_p, min_keep)
    return scores
