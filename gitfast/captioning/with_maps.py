"""`Captioner.caption(..., return_maps=True)`: each result gets `.maps` (`gitfast.explain.maps.word_maps`).

Each input is read, preprocessed and encoded once, by the captioning pass; maps reuse what it made:
- its `Prepared` inputs are tapped as the model takes them (`Captioner._results(..., tap=)`): the prompt
  ids and the pixels (the tensor the engine encodes) are kept;
- the image tokens the captioning pass encodes are caught as they are made (a forward hook on
  `model.proj`, finished with the same `proj_ln` step as `GitModel.encode_images`, for as long as this
  generator runs) and handed to the kept inputs in order: the engine and beam search encode the
  inputs they are given in the order they are given, one row each (the Captioner sets no `image_key`,
  so no image is shared). Once an input has its tokens its pixels are dropped; an input whose tokens
  were not caught is encoded again from its kept pixels (same maps, more time).
Results arrive in input order, one per input, and are matched with the kept inputs in turn; a batch of
results at a time is then decoded once more on the plain path that yields attention probabilities
(`maps.word_maps`, given the image tokens). Held at any time: the inputs the captioner has taken and
not yet answered (its look-ahead and reorder window) plus one batch waiting for its maps. Captioning
itself is untouched; error results keep `maps=None`.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Deque, Iterable, Iterator, List, Optional

import torch


@dataclasses.dataclass
class Kept:
    """What maps need of one input, taken from the captioning pass."""
    index: int
    prompt_ids: Optional[List[int]]
    pixel_values: Optional[torch.Tensor]   # [1, 3, H, W] until the image tokens are caught; None on error
    image: Optional[torch.Tensor] = None   # [I, W] image tokens from the captioning pass
    ok: bool = True


def captioned_with_maps(captioner, pairs: Iterable, settings: dict) -> Iterator:
    """The Captioner's results for `pairs` (image, prompt), each with `.maps`."""
    kept: Deque[Kept] = deque()        # every input taken, until its result arrives
    awaiting: Deque[Kept] = deque()    # the good ones whose image tokens are still to come
    model = captioner.model

    def tap(prepared):
        ok = prepared.error is None and prepared.pixel_values is not None
        item = Kept(prepared.index, prepared.prompt_ids, prepared.pixel_values if ok else None, ok=ok)
        kept.append(item)
        if ok:
            awaiting.append(item)
        return prepared

    running = [False]  # True only while the captioning pass runs (not while the caller holds a result)

    def caught(module, inputs, output):
        from .. import ops

        if not running[0]:
            return
        if output.shape[0] > len(awaiting):  # not the rows expected: encode the rest again instead
            awaiting.clear()
            return
        image = ops.add_layer_norm(output, None, model.proj_ln.weight, model.proj_ln.bias, model.proj_ln.eps)[0]
        for row in image:
            item = awaiting.popleft()
            item.image, item.pixel_values = row, None

    handle = model.proj.register_forward_hook(caught)
    try:
        results = _while_running(captioner._results(pairs, settings, tap=tap), running)
        yield from with_maps(model, results, kept, captioner.max_batch_size)
    finally:
        handle.remove()


def _while_running(results: Iterator, running: List[bool]) -> Iterator:
    """`results`, with `running[0]` True exactly while the next one is being made."""
    while True:
        running[0] = True
        try:
            result = next(results)
        except StopIteration:
            return
        finally:
            running[0] = False
        yield result


def with_maps(model, results: Iterable, kept: Deque[Kept], batch: int) -> Iterator:
    """`results` (in input order, one per input in `kept`) with `.maps` set, `batch` results at a time."""
    pending = []
    for index, result in enumerate(results):
        item = kept.popleft()
        if item.index != index:
            raise RuntimeError(f"word maps: result {index} arrived for input {item.index}")
        pending.append((result, item))
        if len(pending) >= batch:
            yield from _mapped(model, pending)
            pending = []
    yield from _mapped(model, pending)


def _mapped(model, pending) -> Iterator:
    from ..explain import maps

    todo = [(n, result, item) for n, (result, item) in enumerate(pending)
            if result.ok and item.ok and (item.image is not None or item.pixel_values is not None)]
    computed = {}
    if todo:
        items = [item for _, _, item in todo]
        out = maps.word_maps(model, None, [item.prompt_ids for item in items],
                             [list(result.token_ids) for _, result, _ in todo], image=_image_tokens(model, items))
        computed = {n: m for (n, _, _), m in zip(todo, out)}
    for n, (result, _) in enumerate(pending):
        yield dataclasses.replace(result, maps=computed.get(n))


@torch.inference_mode()
def _image_tokens(model, items: List[Kept]) -> torch.Tensor:
    """[B, I, W]: the caught image tokens; any not caught are encoded from their kept pixels."""
    params = next(model.parameters())
    missing = [item for item in items if item.image is None]
    if missing:
        pixels = torch.cat([item.pixel_values for item in missing]).to(params.device, params.dtype)
        for item, row in zip(missing, model.encode_images(pixels)):
            item.image, item.pixel_values = row, None
    return torch.stack([item.image.to(params.device) for item in items])
