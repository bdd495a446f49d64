"""A contiguous, preallocated KV cache and the prefill/decode steps that fill and read it.

This is the simple cache behind `GitForCausalLM.generate`: one `[batch, max_len, heads, head_dim]`
K and V tensor per layer, allocated once per call. Image tokens are encoded and prefilled once;
each decode step writes one token per row. (The paged, block-shared cache lives in `cache.py`.)
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import attention


class KVCache:
    def __init__(self, num_layers, batch, max_len, heads, head_dim, dtype, device):
        shape = (batch, max_len, heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][:, start:start + k.shape[1]] = k
        self.v[layer][:, start:start + v.shape[1]] = v

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` (beam search keeps the beams it extends)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


class DecodeState:
    """Runs GIT's decoder over a batch: `prefill` once, then `step` one token per row."""

    def __init__(self, model, batch: int, num_image: int, text_len: int, max_new_tokens: int, dtype, device):
        cfg = model.config
        self.model = model
        self.num_image = num_image
        self.cache = KVCache(cfg.num_hidden_layers, batch, self.num_image + text_len + max_new_tokens,
                             cfg.num_attention_heads, model.head_dim, dtype, device)
        self.key_mask: Optional[torch.Tensor] = None  # [B, max_len] bool, only when the prompt is padded
        self.next_position: Optional[torch.Tensor] = None

    def prefill(self, image_tokens, input_ids, text_mask=None, position_ids=None) -> torch.Tensor:
        """Fills the cache with `[image | text]`; returns the last position's logits [B, vocab]."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        h = torch.cat([image_tokens, self.model.embed_text(input_ids, position_ids)], dim=1)
        padded = text_mask is not None and not bool(text_mask.all())
        if padded:
            self.key_mask = torch.ones(b, self.cache.k[0].shape[1], dtype=torch.bool, device=h.device)
            self.key_mask[:, self.num_image:self.num_image + t] = text_mask.bool()

        def attend(layer, q, k, v):
            self.cache.write(layer, 0, k, v)
            return attention.prefill(q, k, v, self.num_image, text_mask if padded else None)

        h = self.model.decode(h, attend)
        self.cache.length = self.num_image + t
        self.next_position = position_ids[:, -1] + 1
        return self.model.lm_head(h[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends one token per row; returns logits [B, vocab] for the next."""
        start = self.cache.length
        h = self.model.embed_text(tokens[:, None], self.next_position[:, None])

        def attend(layer, q, k, v):
            self.cache.write(layer, start, k, v)
            return attention.cached(q, self.cache.k[layer], self.cache.v[layer], start + 1, self.key_mask)

        h = self.model.decode(h, attend)
        self.cache.length = start + 1
        self.next_position = self.next_position + 1
        return self.model.lm_head(h[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.next_position = self.next_position.index_select(0, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
