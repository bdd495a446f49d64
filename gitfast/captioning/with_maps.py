"""`Captioner.caption(..., return_maps=True)`: each result gets `.maps` (`gitfast.maps.word_maps`).

The inputs are remembered as they stream into the Captioner (at most its look-ahead), and every
result, which arrives in input order, is matched with its input, prepared again the same way
(same pixels and prompt ids) and, a batch at a time, decoded once more on the plain path that
yields attention probabilities. Captioning itself is untouched; error results keep `maps=None`.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Deque, Iterable, Iterator

import torch


def captioned_with_maps(captioner, pairs: Iterable, settings: dict) -> Iterator:
    """The Captioner's results for `pairs` (image, prompt), each with `.maps`."""
    seen: Deque = deque()
    results = captioner._results(remembered(pairs, seen), settings)
    return with_maps(captioner, results, seen, settings["max_new_tokens"], captioner.max_batch_size)


def remembered(pairs: Iterable, seen: Deque) -> Iterator:
    """`pairs` (image, prompt) as they are, each also appended to `seen`."""
    for pair in pairs:
        seen.append(pair)
        yield pair


def with_maps(captioner, results: Iterable, seen: Deque, max_new_tokens: int, batch: int) -> Iterator:
    """`results` (in input order, one per input in `seen`) with `.maps` set, `batch` results at a time."""
    pending = []
    for index, result in enumerate(results):
        image, prompt = seen.popleft()
        pending.append((index, result, image, prompt))
        if len(pending) >= batch:
            yield from _mapped(captioner, pending, max_new_tokens)
            pending = []
    yield from _mapped(captioner, pending, max_new_tokens)


def _mapped(captioner, pending, max_new_tokens: int) -> Iterator:
    from .. import maps

    prepared = {}
    for index, result, image, prompt in pending:
        if result.ok:
            p = captioner.preparer(index, image, prompt, max_new_tokens)
            if p.error is None:
                prepared[index] = p
    computed = {}
    if prepared:
        items = list(prepared.items())
        pixels = torch.cat([p.pixel_values for _, p in items])
        token_ids = [list(r.token_ids) for i, r, _, _ in pending if i in prepared]
        for (index, _), m in zip(items, maps.word_maps(captioner.model, pixels, [p.prompt_ids for _, p in items],
                                                       token_ids)):
            computed[index] = m
    for index, result, _, _ in pending:
        yield dataclasses.replace(result, maps=computed.get(index))
