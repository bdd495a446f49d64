"""Runs a scheduler's `Plan` on the model: the device side of one engine step.

For each plan: the new images through the vision encoder in one batch (on the CPU, in chunks small
enough for the allocator: image_chunks) and into the prefix blocks the scheduler took (one decoder
pass over their tokens, chunked alike), the admitted sequences' prompts prefilled and
their first tokens chosen, then one decode step for every sequence the plan names (the new ones too:
their first token already sits in `SlotState`). Nothing here waits for the device: a step's inputs
are gathered and advanced on the device, and its tokens are read back one step late (`run` returns
the handle, `read` waits for it after the next step has been queued; see engine.py).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

from ..devices import placement
from . import image_chunks
from .paged_runner import PagedRunner, SlotState
from .scheduler import Plan, Sequence
from .selection import Selector, request_seed
from .slots import Readback


class PlanExecutor:
    """The per-run device state (token selection, decode inputs, readback) and the runs of plans."""

    def __init__(self, model, runner: PagedRunner, settings, seed: int, table_width: int):
        self.model, self.runner, self.cache, self.seed = model, runner, runner.cache, seed
        self.device, self.dtype = placement(model)
        self.selector = Selector(settings, 0, model.config.vocab_size, self.device, self.cache.staging)
        self.state = SlotState(self.cache, 0, table_width)
        self.readback = Readback(self.device, 0)  # all three grown as slots are handed out

    def run(self, plan: Plan) -> Optional[Tuple[List[Sequence], object]]:
        """Launches the plan; returns its tokens' readback (sequences, handle), or None if it chose none."""
        first = None
        if plan.prefill:
            for part in (self.selector, self.state):
                part.reserve(plan.slots)
            self.readback.reserve(2 * plan.slots)  # new sequences' first tokens + a step's
            first = self._prefill(plan)
        chosen = self._decode(plan.decode) if plan.decode else None
        if first is None and chosen is None:
            return None
        both = chosen if first is None else first if chosen is None else torch.cat([first, chosen])
        return plan.prefill + plan.decode, self.readback.start(both)

    def read(self, launched: Tuple[List[Sequence], object]) -> Iterator[Tuple[Sequence, int]]:
        """Waits for a launched plan's tokens: (sequence, token) in launch order."""
        seqs, handle = launched
        return zip(seqs, self.readback.finish(handle))

    def _prefill(self, plan: Plan) -> torch.Tensor:
        """New prefixes written, the admitted sequences started on them and prefilled; their first
        tokens chosen (left on the device)."""
        if plan.encode:
            pixels = torch.stack([px for _, px in plan.encode]).to(self.device, self.dtype)
            self.runner.encode_prefixes(image_chunks.encode_images(self.model, pixels), [p for p, _ in plan.encode])
        new = plan.prefill
        for s in new:
            self.cache.copy_partial(s.prefix, s.blocks)
            self.selector.start(s.slot, s.request.prompt, request_seed(self.seed, s.index))
        prompts = [s.request.prompt for s in new]
        logits = self.runner.prefill([s.blocks for s in new], prompts, plan.image_tokens)
        rows = self.cache.staging.tensor([s.slot for s in new])
        chosen = self.selector.select(logits, rows)
        self.state.start(rows, [s.blocks for s in new], [len(p) for p in prompts], chosen)
        return chosen

    def _decode(self, stepping: List[Sequence]) -> torch.Tensor:
        """One decode step for `stepping`, inputs gathered and advanced on the device."""
        rows = self.state.rows(tuple(s.slot for s in stepping))
        tokens, positions, meta = self.state.inputs(rows, max(s.blocks.length for s in stepping) + 1)
        logits = self.runner.step(tokens, positions, meta)
        chosen = self.selector.select(logits, rows)
        self.state.advance(rows, meta.context_lens, positions, chosen)
        return chosen
