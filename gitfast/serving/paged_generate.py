"""`generate` over the paged cache, returning the tensor transformers would.

- greedy: through the engine (continuous batching; rows retire as they finish), then laid out as
  transformers lays out its batch: the prompt as given (left padding kept), the new tokens, and
  `pad_token_id` after EOS up to the longest row;
- beam search, sampling with transformers' RNG stream, and anything that needs per-step scores:
  rows step in lockstep (`PagedStepper`) under `generation.py`'s transformers-exact loops; every copy
  of a row (a beam, a returned sample) shares the row's image prefix blocks, and beam search
  reorders only their private blocks.

Both size their cache with `scheduler.kv_budget`. Lockstep keeps a cache of its own per call rather
than the engine's: transformers' loops step one fixed, padded batch (the id tensor its processors and
beam bookkeeping read), reorder beams by copying blocks and need every step's scores, none of which the
engine's slots, lagged readback and decode graphs provide; putting them on the kept engine's pools
would also hold that engine for the whole call. Its greedy path is the engine's.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import generation
from .paged_cache import PagedKVCache
from ..devices import placement
from .engine import Engine, Request
from .scheduler import kv_budget
from .paged_runner import PagedRunner, PagedStepper


BLOCK_SIZE = 16


def _rows(input_ids, attention_mask) -> List[List[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]


def _budget(model, rows: int, prefixes: int, n_img: int, prompt_len: int, s, block_size: int, dtype) -> int:
    """KV-cache bytes for `rows` sequences over `prefixes` images of `n_img` tokens each."""
    cfg = model.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_attention_heads,
                                             cfg.hidden_size // cfg.num_attention_heads, dtype)
    return kv_budget(per_block, block_size, n_img, max(s.max_length, prompt_len) + 1, rows, prefixes)


def engine_budget(model, rows: int, images: int, prompt_len: int, s, block_size: int = BLOCK_SIZE) -> int:
    """KV-cache bytes a generate call over `rows` sequences and `images` prefixes needs."""
    return _budget(model, rows, images, model.num_image_tokens, prompt_len, s, block_size, placement(model)[1])


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
def lockstep(model, image_tokens: torch.Tensor, input_ids, attention_mask, s, expand: int, proc_factory,
             block_size: int = BLOCK_SIZE):
    """Rows stepped together under transformers' exact loops: `generation.beam_search` with
    `s.num_beams` beams per row, else `generation.sample_or_greedy` with `expand` copies of each row
    (returned samples). `image_tokens` [B, I, hidden] (I may be 0). Every copy of a row shares the
    row's image prefix blocks; beams reorder only their private blocks. Returns the loop's
    (sequences, scores)."""
    b, t = input_ids.shape
    dtype = image_tokens.dtype
    n_img = image_tokens.shape[1]  # the image's own count (interpolate_pos_encoding: not the config's)
    cache = PagedKVCache.from_budget(model.config, _budget(model, b * expand, b, n_img, t, s, block_size, dtype),
                                     block_size, dtype, image_tokens.device)
    runner = PagedRunner(model, cache)
    prefixes = runner.encode_prefixes(image_tokens)
    prompts = _rows(input_ids, attention_mask)
    seqs, row_prompts = [], []
    for i in range(b):
        for _ in range(expand):
            seqs.append(cache.start_sequence(prefixes[i], n_img + s.max_length + 1))
            row_prompts.append(prompts[i])
    for p in prefixes:  # the rows hold their own references now
        cache.release_prefix(p)
    logits = runner.prefill(seqs, row_prompts, n_img)
    positions = torch.tensor([len(p) for p in row_prompts], device=image_tokens.device)
    stepper = PagedStepper(runner, seqs, positions)
    rows = torch.arange(b, device=input_ids.device).repeat_interleave(expand)
    pad_lengths = (attention_mask != 0).int().argmax(dim=1)[rows]
    proc = proc_factory(pad_lengths, logits.shape[-1])
    loop = generation.beam_search if s.num_beams > 1 else generation.sample_or_greedy
    try:
        return loop(stepper, logits, input_ids[rows], s, proc)
    finally:
        stepper.release()
