"""`generate` over the paged cache, returning the tensor transformers would.

- greedy: through the engine (continuous batching; rows retire as they finish), then laid out as
  transformers lays out its batch: the prompt as given (left padding kept), the new tokens, and
  `pad_token_id` after EOS up to the longest row;
- beam search: every beam of an image shares the image's prefix blocks; beams step in lockstep
  (`PagedStepper`) under `generation.beam_search`, which reorders only their private blocks.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import generation
from .paged_cache import PagedKVCache
from .engine import Engine, Request
from .paged_runner import PagedRunner, PagedStepper


def _rows(input_ids, attention_mask) -> List[List[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]


def _budget(model, rows: int, prefixes: int, prompt_len: int, s, block_size: int, dtype) -> int:
    cfg = model.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_attention_heads,
                                             cfg.hidden_size // cfg.num_attention_heads, dtype)
    n_img = model.num_image_tokens
    per_row = -(-(n_img + max(s.max_length, prompt_len) + 1) // block_size) + 1
    per_prefix = -(-n_img // block_size)
    return per_block * (rows * per_row + prefixes * per_prefix)


def engine_for(owner, model, rows: int, images: int, prompt_len: int, s, block_size: int = 16) -> Engine:
    """The engine cached on `owner`, rebuilt only when this call needs more rows or blocks (or the
    model moved), so repeated generate calls keep their cache pools and CUDA graphs."""
    p = next(model.parameters())
    budget = _budget(model, rows, images, prompt_len, s, block_size, p.dtype)
    e = getattr(owner, "_gitfast_engine", None)
    if (e is None or e.device != p.device or e.dtype != p.dtype or e.max_batch_size < rows
            or e.cache.allocator.num_blocks * e.cache.bytes_per_block(
                model.config.num_hidden_layers, block_size, model.config.num_attention_heads,
                model.head_dim, p.dtype) < budget):
        e = None
        owner._gitfast_engine = None  # let the old pools go before allocating new ones
        e = Engine(model, max_batch_size=rows, kv_cache_bytes=budget, block_size=block_size)
        owner._gitfast_engine = e
    return e


def greedy(engine: Engine, pixel_values: Optional[torch.Tensor], input_ids, attention_mask, s,
           image_of_row) -> torch.Tensor:
    """`image_of_row[i]`: which image row i looks at (several questions may share one image)."""
    b, t = input_ids.shape
    prompts = _rows(input_ids, attention_mask)
    requests = [Request(None if pixel_values is None else pixel_values[image_of_row[i]], prompts[i],
                        image_key=None if pixel_values is None else int(image_of_row[i]),
                        max_new_tokens=s.max_length - t)  # transformers counts the padded prompt
                for i in range(b)]
    outs = engine.generate(requests, s)
    width = t + max(len(o.token_ids) for o in outs)
    result = torch.full((b, width), s.pad, dtype=input_ids.dtype, device=input_ids.device)
    result[:, :t] = input_ids
    for i, o in enumerate(outs):
        result[i, t:t + len(o.token_ids)] = torch.tensor(o.token_ids, dtype=input_ids.dtype)
    return result


@torch.inference_mode()
def beam(model, image_tokens: torch.Tensor, input_ids, attention_mask, s, proc_factory, block_size: int = 16):
    """Beam search with `s.num_beams` beams per row; `image_tokens` [B, I, hidden] (I may be 0)."""
    k = s.num_beams
    b, t = input_ids.shape
    dtype = image_tokens.dtype
    cache = PagedKVCache.from_budget(model.config, _budget(model, b * k, b, t, s, block_size, dtype),
                                     block_size, dtype, image_tokens.device)
    runner = PagedRunner(model, cache)
    prefixes = runner.encode_prefixes(image_tokens)
    prompts = _rows(input_ids, attention_mask)
    n_img = image_tokens.shape[1]
    seqs, beam_prompts = [], []
    for i in range(b):
        for _ in range(k):
            seqs.append(cache.start_sequence(prefixes[i], n_img + s.max_length + 1))
            beam_prompts.append(prompts[i])
    for p in prefixes:  # the beams hold their own references now
        cache.release_prefix(p)
    logits = runner.prefill(seqs, beam_prompts, n_img)
    positions = torch.tensor([len(p) for p in beam_prompts], device=image_tokens.device)
    stepper = PagedStepper(runner, seqs, positions)
    rows = torch.arange(b, device=input_ids.device).repeat_interleave(k)
    pad_lengths = (attention_mask != 0).int().argmax(dim=1)[rows]
    proc = proc_factory(pad_lengths, logits.shape[-1])
    try:
        return generation.beam_search(stepper, logits, input_ids[rows], s, proc)
    finally:
        stepper.release()
