"""Lockstep: the engine's mode for transformers' exact loops, on the engine's own KV cache.

The engine's other mode, continuous batching, admits and retires sequences as they come and go, reads
tokens back a step late and replays decode steps from CUDA graphs. transformers' loops
(`generation.sample_or_greedy`, `generation.beam_search`) need the opposite: one fixed, padded batch
stepped together (the id tensor its processors and beam bookkeeping read), its global RNG stream when
sampling, beams reordered by copying blocks, and every step's scores. So a lockstep run takes the same
`Request`s, and runs them as one batch:

- the requests' distinct images (`image_key`) go through the vision encoder in one batch and into one
  prefix each, shared by every request and every copy (beam, returned sample) that uses it;
- each copy starts a sequence on its image's prefix with blocks for `max_length` tokens, borrowed from
  the engine's allocator (the engine holds its lock and a lease for the run, so they always go back);
- the loop steps every copy until all are done (eager decode steps, as transformers' loops are written);
- each request's rows come back as one `Output`: `sequences` laid out as transformers lays them out
  (prompt with its padding, new tokens, padding after EOS), `scores` the loop's, and `token_ids` the
  first row's new tokens up to its EOS.

`Lockstep` holds what transformers' loops need beyond the requests: the padded batch as the caller gave
it, how many copies of each request, the logits processor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional

import torch

from ..devices import placement
from . import generation, image_chunks
from .paged_runner import PagedRunner, PagedStepper
from .scheduler import Output, Request, prefix_key


@dataclass
class Lockstep:
    """The lockstep mode of an engine run (`Engine.run(..., lockstep=Lockstep(...))`)."""
    copies: int = 1                                # rows per request: num_beams when beam searching, else
                                                   # returned samples (num_return_sequences)
    input_ids: Optional[torch.Tensor] = None       # [B, T] the prompts as the loops see them (left padding
                                                   # kept); None: the requests' prompts, left-padded
    attention_mask: Optional[torch.Tensor] = None  # [B, T] 1 on prompt tokens (with input_ids)
    processor: Optional[Callable] = None           # (pad_lengths [B * copies], vocab) -> the loops' logits
                                                   # processor; None: `generation.Processor`
    interpolate_pos_encoding: bool = False         # images of another size than the checkpoint's


class Images(NamedTuple):
    tokens: torch.Tensor  # [N, I, hidden] the distinct images' tokens (I = 0: text only)
    which: List[int]      # request i looks at image which[i]


def encode_images(model, requests: List[Request], interpolate_pos_encoding: bool = False) -> Images:
    """The requests' distinct images (by `image_key`, in first-use order) through the vision encoder
    in one batch. Text-only requests get a zero-length image each."""
    first: Dict[Hashable, int] = {}
    which = [first.setdefault(prefix_key(i, r), len(first)) for i, r in enumerate(requests)]
    device, dtype = placement(model)
    if requests[0].pixel_values is None:
        return Images(torch.empty(len(first), 0, model.config.hidden_size, dtype=dtype, device=device), which)
    if any(r.pixel_values is None for r in requests):
        raise ValueError("one lockstep run takes either image requests or text-only requests, not both")
    pixels = torch.stack([requests[i].pixel_values for i in first.values()])
    return Images(image_chunks.encode_images(model, pixels.to(device, dtype), interpolate_pos_encoding), which)


def _padded(requests: List[Request], mode: Lockstep, pad: int, device):
    """The batch the loops read: the caller's, else the prompts left-padded with `pad`."""
    if mode.input_ids is not None:
        mask = mode.attention_mask if mode.attention_mask is not None else torch.ones_like(mode.input_ids)
        return mode.input_ids, mask
    width = max(len(r.prompt) for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, r in enumerate(requests):
        ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[row, width - len(r.prompt):] = 1
    return ids.to(device), mask.to(device)


def run(runner: PagedRunner, requests: List[Request], s: generation.Settings, mode: Lockstep,
        images: Images) -> List[Output]:
    """The lockstep run on `runner`'s cache, which the engine sized for it (`Engine._lockstep`) and
    holds a lease on: `generation.beam_search` when `s.num_beams > 1`, else `generation.sample_or_greedy`."""
    cache, copies = runner.cache, mode.copies
    input_ids, mask = _padded(requests, mode, s.pad, images.tokens.device)
    n_img = images.tokens.shape[1]  # the images' own count (interpolate_pos_encoding: not the config's)
    prefixes = runner.encode_prefixes(images.tokens)
    seqs = [cache.start_sequence(prefixes[images.which[i]], n_img + s.max_length + 1)
            for i in range(len(requests)) for _ in range(copies)]
    for p in prefixes:  # the sequences hold their own references now
        cache.release_prefix(p)
    try:
        prompts = [r.prompt for r in requests for _ in range(copies)]
        logits = runner.prefill(seqs, prompts, n_img)
        stepper = PagedStepper(runner, seqs, torch.tensor([len(p) for p in prompts], device=input_ids.device))
        rows = torch.arange(len(requests), device=input_ids.device).repeat_interleave(copies)
        pad_lengths = (mask != 0).int().argmax(dim=1)[rows]
        proc = (mode.processor(pad_lengths, logits.shape[-1]) if mode.processor is not None
                else generation.Processor(s, input_ids.shape[1], pad_lengths, logits.shape[-1], input_ids.device))
        loop = generation.beam_search if s.num_beams > 1 else generation.sample_or_greedy
        sequences, scores = loop(stepper, logits, input_ids[rows], s, proc)
    finally:
        for seq in seqs:
            cache.release(seq)
    return _outputs(sequences, scores, len(requests), input_ids.shape[1], s)


def _outputs(sequences: torch.Tensor, scores, batch: int, prompt_len: int, s) -> List[Output]:
    """The loop's batch, one `Output` per request: its rows of `sequences` and of the scores (beam
    search's sequence scores, or each step's scores when `s.output_scores`)."""
    per = sequences.shape[0] // batch
    first_rows = sequences[::per, prompt_len:].tolist()
    eos, out = set(s.eos), []
    for i, new in enumerate(first_rows):
        end = next((n + 1 for n, t in enumerate(new) if t in eos), None)
        rows = slice(i * per, (i + 1) * per)
        if s.num_beams > 1:
            mine = scores[rows]
        else:
            mine = tuple(step[rows] for step in scores) if s.output_scores else None
        out.append(Output(i, new[:end], "length" if end is None else "eos", sequences[rows], mine))
    return out
