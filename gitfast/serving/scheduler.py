"""The scheduler: which requests run, what KV cache they hold, when they are finished. No tensors.

The engine is three parts with one job each, and this module is the first:

    requests ──► Scheduler.schedule() ──► Plan ──► PlanExecutor.run(plan) ──► readback ──► Scheduler.emit()
                 (bookkeeping: this file)          (the model: executor.py)                  (Outputs)

- `Request`: what every front end hands the engine (the drop-in's greedy `generate`, `Captioner`,
  `gitfast caption`, Ray Data through the Captioner): prompt ids, the image's pixels and a key under
  which requests share one image prefix, an optional new-token limit. Settings (`generation.Settings`:
  greedy, sampling or beams, EOS, lengths) are one per run. The run's mode is the caller's: continuous
  batching (this scheduler), or lockstep (`lockstep.py`: transformers' exact loops over the same
  requests as one batch, on blocks of the same cache, sized by the same `kv_budget`).
- `Scheduler`: owns the waiting queue (pulled lazily from the run's iterable, at most `max_rows`
  ahead), the running sequences, slot numbers and the image prefixes the look-ahead window still
  needs. `schedule()` admits waiting requests in order while the batch has room and the cache has
  every block their whole length can take (reserved up front, so a running sequence never runs out;
  a request that fits an empty cache waits; one that does not is refused, `KVCacheTooSmall`), takes
  their blocks and returns a `Plan`. `ran(plan)` advances the bookkeeping once the plan is launched;
  `emit(tokens)` appends read-back tokens and retires finished sequences (`stopping.finish_reason`),
  giving their blocks and slots back.
- `Plan`: new image prefixes to compute (their blocks already taken), sequences to start and prefill,
  and the sequences that take one decode step; plain data the executor runs.
- `kv_blocks` / `kv_budget`: the one formula for how much cache a set of sequences holds, exactly what
  admission reserves; the engine sizes its cache with it, in both modes, and so does the drop-in's kept engine.

Blocks are taken and given back through `paged_cache.KVBlocks` (bookkeeping only), so the scheduler
runs, and is tested, without a model (tests/test_scheduler.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Hashable, Iterable, Iterator, List, Optional, Tuple

from . import stopping
from .paged_cache import KVBlocks, Prefix, SeqBlocks, private_blocks
from .slots import Slots


class KVCacheTooSmall(RuntimeError):
    """Not even one request fits the KV cache the engine may have: no waiting would help."""


@dataclass
class Request:
    pixel_values: Optional[object]         # [3, H, W] or [frames, 3, H, W] tensor, preprocessed; None = text only
    prompt: List[int]                      # starts with [CLS]
    image_key: Optional[Hashable] = None   # requests with equal keys share one image prefix
    max_new_tokens: Optional[int] = None   # default: the settings' max_length minus the prompt


@dataclass
class Output:
    index: int
    token_ids: List[int]                   # generated tokens, EOS included when it ended the sequence
    finish_reason: str                     # "eos" or "length"
    # lockstep runs only (`lockstep.py`): the request's rows as transformers lays them out, and its scores
    sequences: Optional[object] = None     # [rows, T + new] tensor: prompt (padding kept), new tokens, padding
    scores: Optional[object] = None        # beam search: [rows] sequence scores; else each step's [rows, vocab]


@dataclass(eq=False)  # compared by identity
class Sequence:
    """An admitted request: its slot, its blocks, the tokens read back so far."""
    index: int                             # the request's position in the run's input
    request: Request
    key: Hashable                          # its image prefix's key
    max_new: int                           # tokens it may generate (`stopping.new_token_limit`)
    total: int                             # tokens its blocks hold at the end: image + prompt + max_new
    slot: int
    prefix: Optional[Prefix] = None        # its image's prefix, set when its blocks are taken
    blocks: Optional[SeqBlocks] = None
    tokens: List[int] = field(default_factory=list)  # read back so far
    launched: int = 1      # tokens chosen or being chosen on the device (the first by prefill)
    done: bool = False     # retired: blocks and slot released


@dataclass
class Plan:
    """One step's work, for `executor.PlanExecutor.run`."""
    image_tokens: int                      # this run's prefix length (0: text only)
    encode: List[Tuple[Prefix, object]]    # new images: the prefix blocks to write, and the pixels
    prefill: List[Sequence]                # admitted: copy a partial prefix block, prefill the prompt
    decode: List[Sequence]                 # one decode step: every running sequence with a token to feed
    slots: int                             # slots handed out so far: per-slot state covers 0..slots-1


def kv_blocks(block_size: int, image_tokens: int, text_tokens: int, rows: int = 1,
              images: Optional[int] = None) -> int:
    """Blocks `rows` sequences of `image_tokens + text_tokens` tokens hold at once, `images` distinct
    images among them (default: one each) — exactly what admission reserves for them: each image's
    prefix blocks once, and each row's private blocks (a copy of a partial prefix block, then text)."""
    images = rows if images is None else images
    prefix = -(-image_tokens // block_size)
    return rows * private_blocks(block_size, image_tokens, image_tokens + text_tokens) + images * prefix


def kv_budget(bytes_per_block: int, block_size: int, image_tokens: int, text_tokens: int, rows: int = 1,
              images: Optional[int] = None) -> int:
    """`kv_blocks` in bytes: the one KV-cache sizing rule of the serving wing."""
    return bytes_per_block * kv_blocks(block_size, image_tokens, text_tokens, rows, images)


def prefix_key(index: int, request: Request) -> Hashable:
    """The key of the image prefix request `index` uses: its `image_key`, else one of its own."""
    return request.image_key if request.image_key is not None else ("request", index)


class Scheduler:
    """One engine run's waiting and running requests and the blocks they hold (see the module docstring).

    `numbered` yields (index, request) pairs; `waiting` may hold the first ones, already taken off it.
    `image_tokens` is the model's prefix length, `positions` its text position table's size."""

    def __init__(self, numbered: Iterator[Tuple[int, Request]], settings, blocks: KVBlocks, *, max_rows: int,
                 image_tokens: int, positions: int, waiting: Optional[Deque[Tuple[int, Request]]] = None):
        self.source, self.settings, self.blocks = numbered, settings, blocks
        self.max_rows, self.image_tokens, self.positions = max_rows, image_tokens, positions
        self.waiting: Deque[Tuple[int, Request]] = deque() if waiting is None else waiting
        self.running: List[Sequence] = []
        self.prefixes: Dict[Hashable, Prefix] = {}  # images the running or waiting requests use
        self.slots = Slots()
        self.eos = set(settings.eos)
        self.text_only: Optional[bool] = None  # fixed by the first request: image prefixes or none
        self.exhausted = False

    @property
    def image_len(self) -> int:
        return 0 if self.text_only else self.image_tokens

    def schedule(self) -> Optional[Plan]:
        """The next step's plan, its blocks taken; None when every request is finished. Raises
        `KVCacheTooSmall` when nothing runs and the head of the queue does not fit the empty cache."""
        self.running = [s for s in self.running if not s.done]
        self._pull()
        admitted = self._admit()
        if not self.running and not admitted:
            if self.waiting:
                a = self.blocks.allocator
                raise KVCacheTooSmall(f"request {self.waiting[0][0]} needs more KV cache than the engine has "
                                      f"({a.num_blocks} blocks of {self.blocks.block_size}); "
                                      "raise kv_cache_bytes or lower max_new_tokens")
            return None
        encode = self._take_blocks(admitted)
        self.running.extend(admitted)
        decode = [s for s in self.running if s.launched < s.max_new]
        return Plan(self.image_len, encode, admitted, decode, self.slots.high)

    def ran(self, plan: Plan) -> None:
        """The plan is launched: each stepped sequence holds one more token, and the prefix of an image
        no waiting request uses is let go (a started sequence holds its own references to it)."""
        for s in plan.decode:
            s.blocks.length += 1
            s.launched += 1
        waiting = {prefix_key(i, r) for i, r in self.waiting}
        for key in {s.key for s in plan.prefill} - waiting:
            self.blocks.release_prefix(self.prefixes.pop(key))

    def emit(self, tokens: Iterable[Tuple[Sequence, int]]) -> Iterator[Output]:
        """Appends each read-back token to its sequence; retires and yields the finished ones. A token
        of a sequence retired a step earlier (it ran one step past its EOS) is dropped."""
        for seq, token in tokens:
            if seq.done:
                continue
            seq.tokens.append(token)
            reason = stopping.finish_reason(seq.tokens, self.eos, seq.max_new)
            if reason is not None:
                seq.done = True
                self.blocks.release(seq.blocks)
                self.slots.give(seq.slot)
                yield Output(seq.index, list(seq.tokens), reason)

    # --- the steps of `schedule` ------------------------------------------------------------------
    def _pull(self) -> None:
        """Takes requests off the input lazily, only as many as the batch has room for, so a long input
        streams (and prefix sharing looks no further than this window)."""
        while not self.exhausted and len(self.waiting) + len(self.running) < self.max_rows:
            nxt = next(self.source, None)
            if nxt is None:
                self.exhausted = True
            else:
                self.waiting.append(nxt)
        if self.text_only is None and self.waiting:
            self.text_only = self.waiting[0][1].pixel_values is None

    def _admit(self) -> List[Sequence]:
        """Takes requests off the queue, in order, while the batch has room and the cache has every block
        their whole length can take (their image's prefix counted once)."""
        admitted: List[Sequence] = []
        new_keys = set()
        free, image_len = self.blocks.allocator.num_free, self.image_len
        while self.waiting and len(self.running) + len(admitted) < self.max_rows:
            idx, req = self.waiting[0]
            if (req.pixel_values is None) != self.text_only:
                raise ValueError("one engine run takes either image requests or text-only requests, not both")
            max_new = stopping.new_token_limit(req.max_new_tokens, self.settings.max_length, len(req.prompt),
                                               self.positions)
            total, key = image_len + len(req.prompt) + max_new, prefix_key(idx, req)
            need = self.blocks.blocks_needed(image_len, total)
            if key not in self.prefixes and key not in new_keys:
                need += self.blocks.blocks_for(image_len)
            if need > free:
                break
            free -= need
            new_keys.add(key)
            self.waiting.popleft()
            admitted.append(Sequence(idx, req, key, max_new, total, self.slots.take()))
        return admitted

    def _take_blocks(self, admitted: List[Sequence]) -> List[Tuple[Prefix, object]]:
        """A new prefix for each image seen for the first time (in order), then each admitted sequence's
        blocks on its image's prefix. Returns the prefixes to compute, with their pixels."""
        encode = []
        for s in admitted:
            if s.key not in self.prefixes:
                self.prefixes[s.key] = self.blocks.new_prefix(self.image_len)
                if self.image_len:
                    encode.append((self.prefixes[s.key], s.request.pixel_values))
        for s in admitted:
            s.prefix = self.prefixes[s.key]
            s.blocks = self.blocks.reserve_sequence(s.prefix, s.total)
        return encode
