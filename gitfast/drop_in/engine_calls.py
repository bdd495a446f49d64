"""The drop-in's calls into the engine: its rows as `Request`s, the outputs laid out as transformers'.

The drop-in's rows become `Request`s (each row's unpadded prompt, and its image under a key, so rows
tiled over one image share its prefix) handed to the kept engine:
- greedy: continuous batching (rows retire as they finish), then laid out as transformers lays out
  its batch: the prompt as given (left padding kept), the new tokens, and `pad_token_id` after EOS up
  to the longest row;
- beam search, sampling with transformers' RNG stream, and anything that needs per-step scores: the
  engine's lockstep mode (`serving/lockstep.py`) with the padded batch as given; each request's rows and
  scores come back in transformers' layout and are joined into the batch's.

`BLOCK_SIZE` is the kept engine's block size; `engine.batch_budget` sizes it for a call.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..serving.engine import Engine, Lockstep, Request


BLOCK_SIZE = 16


def _rows(input_ids, attention_mask) -> List[List[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]


def requests_of(pixel_values: Optional[torch.Tensor], input_ids, attention_mask, image_of_row,
                max_new_tokens: Optional[int] = None) -> List[Request]:
    """One `Request` per row: its unpadded prompt and its image (`image_of_row[i]`: which image row i
    looks at; several rows may share one image, and so its prefix)."""
    prompts = _rows(input_ids, attention_mask)
    return [Request(None if pixel_values is None else pixel_values[image_of_row[i]], prompts[i],
                    image_key=None if pixel_values is None else int(image_of_row[i]), max_new_tokens=max_new_tokens)
            for i in range(len(prompts))]


def generate_continuous(engine: Engine, pixel_values: Optional[torch.Tensor], input_ids, attention_mask, s,
                        image_of_row) -> torch.Tensor:
    """Continuous batching; the rows laid out as transformers' batch."""
    b, t = input_ids.shape
    # transformers counts the padded prompt in max_length
    outs = engine.generate(requests_of(pixel_values, input_ids, attention_mask, image_of_row, s.max_length - t), s)
    width = t + max(len(o.token_ids) for o in outs)
    result = torch.full((b, width), s.pad, dtype=input_ids.dtype, device=input_ids.device)
    result[:, :t] = input_ids
    for i, o in enumerate(outs):
        result[i, t:t + len(o.token_ids)] = torch.tensor(o.token_ids, dtype=input_ids.dtype)
    return result


def generate_lockstep(engine: Engine, pixel_values: Optional[torch.Tensor], input_ids, attention_mask, s,
                      expand: int, proc_factory, image_of_row, interpolate_pos_encoding: bool = False):
    """Rows stepped together under transformers' exact loops (the engine's lockstep mode):
    `generation.beam_search` with `s.num_beams` beams per row, else `generation.sample_or_greedy` with
    `expand` copies of each row (returned samples). Returns the loop's (sequences, scores) for the batch."""
    mode = Lockstep(expand, input_ids, attention_mask, proc_factory, interpolate_pos_encoding)
    outs = engine.generate(requests_of(pixel_values, input_ids, attention_mask, image_of_row), s, lockstep=mode)
    sequences = torch.cat([o.sequences for o in outs])
    if s.num_beams > 1:
        return sequences, torch.cat([o.scores for o in outs])
    if not s.output_scores:
        return sequences, []
    return sequences, [torch.cat(step) for step in zip(*(o.scores for o in outs))]
