"""The engine: continuous batching of GIT requests over the paged KV cache.

Each iteration the scheduler (1) admits waiting requests while the batch has room and the cache has
free blocks for their whole length (blocks are reserved up front, so a running sequence never runs
out; a request that would fit alone waits for blocks instead of failing), (2) encodes the new images
in one vision batch and computes each image's prefix once, shared by every request with the same
`image_key`, (3) prefills the new prompts, (4) decodes one token for every running sequence, and
(5) retires finished sequences, freeing their blocks. Results are yielded as they finish, tagged with
the request's index; `generate` returns them in input order.

The host stays one step behind the device: a decode step's inputs come from device-side state
(`paged_runner.SlotState`), so step t+1 is queued before step t's tokens are read back (a non-blocking copy
waited for by event); a new sequence's first token, chosen by prefill, joins that readback and the
sequence decodes at once. Index tensors built on the host (slots, positions, block tables) reach the
device from pinned memory without a wait (`staging.HostStaging`), so admitting requests while others
decode never stalls the host either. The device never idles while Python does the bookkeeping; the price is one
discarded token for a sequence that ended with EOS at step t. Steps never run past a sequence's
`max_new_tokens`, so its reserved blocks always suffice.

Greedy decoding gives the same tokens as transformers (per-row argmax over identically processed
scores). Sampling is seeded per request (`selection.request_seed`; its noise is a counter-based hash, see
`selection.py`), so it is reproducible and independent of batching, but it is not transformers'
global-RNG stream.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Hashable, Iterable, Iterator, List, Optional, Tuple

import torch

from ..devices import placement
from .exclusive import Exclusive
from .paged_cache import PagedKVCache, Prefix, SeqBlocks
from .generation import Settings
from .paged_runner import PagedRunner, SlotState
from .selection import Selector, request_seed
from .slots import Readback, Slots

log = logging.getLogger(__name__)


class KVCacheTooSmall(RuntimeError):
    """Not even one request fits the KV cache the engine may have: no waiting would help."""


@dataclass
class Request:
    pixel_values: Optional[torch.Tensor]   # [3, H, W] or [frames, 3, H, W], preprocessed; None = text only
    prompt: List[int]                      # starts with [CLS]
    image_key: Optional[Hashable] = None   # requests with equal keys share one image prefix
    max_new_tokens: Optional[int] = None   # default: the settings' max_length minus the prompt


@dataclass
class Output:
    index: int
    token_ids: List[int]                   # generated tokens, EOS included when it ended the sequence
    finish_reason: str                     # "eos" or "length"


@dataclass(eq=False)  # compared by identity: the per-step loop asks `r in new`
class _Running:
    index: int
    seq: SeqBlocks
    slot: int
    max_new: int
    tokens: List[int] = field(default_factory=list)  # read back so far
    launched: int = 1      # tokens chosen or being chosen on the device (the first by prefill)
    done: bool = False     # retired: blocks and slot released


class Engine:
    """Continuous batching over a paged KV cache.

    `kv_cache_bytes` fixes the cache size. Without it the cache is sized at the first run from that
    run's settings and the requests it has queued: min(max_batch_size, queued requests) rows at
    `max_length` text tokens plus one sequence at the position table's end, capped at
    `gpu_memory_fraction` of the free device memory (of the available RAM on the CPU); a later run
    that needs more grows it. Per-slot decode state grows with the sequences running. So memory
    follows the work at hand, not `max_batch_size` (a bound, which may be huge) or the longest
    possible text.
    """

    def __init__(self, model, *, max_batch_size: int = 256, kv_cache_bytes: Optional[int] = None,
                 gpu_memory_fraction: float = 0.5, block_size: int = 16, cuda_graphs: bool = True):
        self.model = model  # a gitfast.model.GitModel in eval mode
        self.device, self.dtype = placement(model)
        self.max_batch_size, self.block_size = max_batch_size, block_size
        self.memory_fraction, self.cuda_graphs = gpu_memory_fraction, cuda_graphs
        longest = model.num_image_tokens + model.config.max_position_embeddings
        # block-table width for any sequence the position table allows (decode state and graphs)
        self.table_width = -(-longest // block_size) + 1
        cfg = model.config
        self.bytes_per_block = PagedKVCache.bytes_per_block(
            cfg.num_hidden_layers, block_size, cfg.num_attention_heads,
            cfg.hidden_size // cfg.num_attention_heads, self.dtype)
        self.fixed_size = kv_cache_bytes is not None
        self.cache: Optional[PagedKVCache] = None
        self.runner: Optional[PagedRunner] = None
        self._running = Exclusive("this engine's run()")  # one run at a time, other threads wait
        if kv_cache_bytes is not None:
            self._allocate(kv_cache_bytes)

    def _allocate(self, nbytes: int) -> None:
        self.cache = self.runner = None  # let the old pools (and graphs over them) go first
        self.cache = PagedKVCache.from_budget(self.model.config, nbytes, self.block_size, self.dtype, self.device)
        self.runner = PagedRunner(self.model, self.cache)
        if self.cuda_graphs and self.device.type == "cuda":
            from .cuda_graphs import DecodeGraphs

            # every running sequence holds a private block, so no step has more rows than blocks
            rows = min(self.max_batch_size, self.cache.allocator.num_blocks)
            self.runner.graphs = DecodeGraphs(self.runner, rows, self.table_width)

    def budget_for(self, settings: Settings, rows: Optional[int] = None) -> int:
        """Bytes of KV cache a run with these settings over `rows` concurrent sequences (at most,
        and by default, max_batch_size) can use, before the memory cap."""
        rows = self.max_batch_size if rows is None else max(1, min(rows, self.max_batch_size))
        n_img, limit = self.model.num_image_tokens, self.model.config.max_position_embeddings
        blocks = lambda tokens: -(-tokens // self.block_size)  # noqa: E731
        text = min(max(settings.max_length, 1) + 1, limit + 1)
        per_row = blocks(n_img + text) + 1            # + the prefix's partial block while it is shared
        one_long = blocks(n_img + limit + 1) + blocks(n_img)  # any single request fits
        return self.bytes_per_block * max(rows * per_row, one_long)

    def held_bytes(self) -> int:
        """Bytes of KV cache the engine holds now."""
        return self.cache.allocator.num_blocks * self.bytes_per_block if self.cache is not None else 0

    def _available_bytes(self) -> Optional[int]:
        held = self.held_bytes()
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free + held
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + held
        except (ValueError, OSError, AttributeError):  # not Linux: no cap known
            return None

    def check_fits(self, settings: Settings) -> None:
        """Raises `KVCacheTooSmall` before anything runs when not even one request with these settings
        fits the KV cache this engine may have (its fixed size, or its share of free memory)."""
        n_img, limit = self.model.num_image_tokens, self.model.config.max_position_embeddings
        blocks = lambda tokens: -(-tokens // self.block_size)  # noqa: E731
        text = min(max(settings.max_length, 1) + 1, limit + 1)
        one = self.bytes_per_block * (blocks(n_img + text) + 1 + blocks(n_img))
        if self.fixed_size:
            cap, what = self.held_bytes(), "the fixed kv_cache_bytes"
        else:
            available = self._available_bytes()
            if available is None:
                return
            cap, what = int(available * self.memory_fraction), (f"{self.memory_fraction:.0%} of the {available} "
                                                                "bytes of memory available")
        if one > cap:
            raise KVCacheTooSmall(f"one request needs {one} bytes of KV cache, more than {what}; "
                                  "lower max_new_tokens or free memory")

    def _size_for(self, settings: Settings, rows: int) -> None:
        if self.fixed_size:
            return
        self.check_fits(settings)
        want = self.budget_for(settings, rows)
        available = self._available_bytes()
        if available is not None:
            want = min(want, int(available * self.memory_fraction))
        if want > self.held_bytes():
            self._allocate(want)

    # --- public API -----------------------------------------------------------------------------
    def generate(self, requests: List[Request], settings: Settings, seed: int = 0) -> List[Output]:
        outs: List[Optional[Output]] = [None] * len(requests)
        for out in self.run(requests, settings, seed):
            outs[out.index] = out
        return outs  # type: ignore[return-value]

    @torch.inference_mode()
    def run(self, requests: Iterable[Request], settings: Settings, seed: int = 0) -> Iterator[Output]:
        """Yields each request's output as soon as it finishes (any order; `.index` says which).

        One run at a time: a run holds the engine until it is exhausted or closed (another thread's
        waits), and gives back all it took from the KV cache however it ends (`BlockAllocator.lease`)."""
        if settings.num_beams > 1:
            raise ValueError("the engine's continuous batching runs greedy and sampling; beam search runs "
                             "through GitForCausalLM.generate")
        with self._running.hold():
            source = iter(enumerate(requests))
            # the first window says how many rows this run can have at once
            first = deque(itertools.islice(source, self.max_batch_size))
            self._size_for(settings, len(first))
            if self.cache is None:  # nothing queued and no cache yet
                return
            with self.cache.allocator.lease():
                yield from self._batches(source, first, settings, seed)

    def _batches(self, source, waiting: Deque[Tuple[int, Request]], settings: Settings,
                 seed: int) -> Iterator[Output]:
        """The scheduling loop of one run: admit, prefill, decode, retire (see the module docstring)."""
        exhausted = False
        prefixes: Dict[Hashable, Prefix] = {}
        running: List[_Running] = []
        free_slots = Slots()
        selector = Selector(settings, 0, self.model.config.vocab_size, self.device, self.cache.staging)
        state = SlotState(self.cache, 0, self.table_width)
        readback = Readback(self.device, 0)  # all three grown as slots are handed out
        eos = set(settings.eos)
        text_only: Optional[bool] = None  # fixed by the first request: image prefixes or none

        pending = None  # the decode step launched last iteration, its tokens not yet read back
        while True:
            # -- admit: pull requests lazily, only as many as the batch has room for, so a long input
            #    streams (and prefix sharing looks no further than this window) --
            while not exhausted and len(waiting) + len(running) < self.max_batch_size:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                else:
                    waiting.append(nxt)
            if text_only is None and waiting:
                text_only = waiting[0][1].pixel_values is None
            admitted = self._admit(waiting, running, free_slots, prefixes, settings, text_only)
            if admitted:
                for part in (selector, state):
                    part.reserve(free_slots.high)
                readback.reserve(2 * free_slots.high)  # new sequences' first tokens + a step's
            if not running and not admitted:
                if waiting:  # nothing running, yet the head of the queue does not fit an empty cache
                    idx, req = waiting[0]
                    raise KVCacheTooSmall(f"request {idx} needs more KV cache than the engine has "
                                       f"({self.cache.allocator.num_blocks} blocks of {self.cache.block_size}); "
                                       "raise kv_cache_bytes or lower max_new_tokens")
                return
            # -- prefill the admitted and choose their first tokens, left on the device: they are
            #    read back with this iteration's step, never waited for here --
            new: List[_Running] = []
            first = None
            if admitted:
                new, first = self._prefill(admitted, prefixes, waiting, selector, state, seed, text_only)
                running.extend(new)
            # -- launch one decode step for every sequence that has a token to feed (the new ones
            #    too: their first token is already in SlotState). Its inputs are gathered and
            #    advanced on the device, so launching needs no tokens from the host: the step runs
            #    while the host reads back the previous one's --
            stepping = [r for r in running if not r.done and r.launched < r.max_new]
            launched = None
            chosen = None
            if stepping:
                rows = state.rows(tuple(r.slot for r in stepping))
                tokens, positions, meta = state.inputs(rows, max(r.seq.length for r in stepping) + 1)
                logits = self.runner.step(tokens, positions, meta)
                chosen = selector.select(logits, rows)
                state.advance(rows, meta.context_lens, positions, chosen)
                for r in stepping:
                    r.seq.length += 1
                    r.launched += 1
            if new or stepping:  # one readback: the new sequences' first tokens, then the step's
                both = chosen if first is None else first if chosen is None else torch.cat([first, chosen])
                launched = (new + stepping, readback.start(both))
            # -- read back the previous step's tokens; retire finished sequences. A sequence that
            #    finished there also ran in the step just launched: that token is discarded, and
            #    its blocks are reused only by work queued after it on the same stream --
            if pending is not None:
                seqs, handle = pending
                for r, t in zip(seqs, readback.finish(handle)):
                    if r.done:
                        continue
                    r.tokens.append(t)
                    out = self._finished(r, eos, free_slots)
                    if out is not None:
                        yield out
            pending = launched
            running = [r for r in running if not r.done]

    def _finished(self, r: _Running, eos, free_slots: Slots) -> Optional[Output]:
        """Retires `r` (frees its blocks and slot) if its last token ended it."""
        done_eos = r.tokens[-1] in eos
        if not (done_eos or len(r.tokens) >= r.max_new):
            return None
        r.done = True
        self.cache.release(r.seq)
        free_slots.give(r.slot)
        return Output(r.index, list(r.tokens), "eos" if done_eos else "length")

    # --- scheduling steps -------------------------------------------------------------------------
    @staticmethod
    def _key(idx: int, req: Request) -> Hashable:
        return req.image_key if req.image_key is not None else ("request", idx)

    def _admit(self, waiting, running, free_slots, prefixes, s: Settings, text_only: bool):
        """Takes requests off the queue while the batch has room and the cache has their blocks."""
        admitted, new_keys = [], set()
        free = self.cache.allocator.num_free
        n_img = self.model.num_image_tokens
        limit = self.model.config.max_position_embeddings
        while waiting and len(running) + len(admitted) < self.max_batch_size:
            idx, req = waiting[0]
            if (req.pixel_values is None) != text_only:
                raise ValueError("one engine run takes either image requests or text-only requests, not both")
            image_len = 0 if text_only else n_img
            max_new = req.max_new_tokens or max(1, s.max_length - len(req.prompt))
            # the position table's end: the last token is never fed, so t prompt tokens take limit + 1 - t
            max_new = max(1, min(max_new, limit + 1 - len(req.prompt)))
            total = image_len + len(req.prompt) + max_new
            key = self._key(idx, req)
            need = self.cache.blocks_needed(image_len, total)
            if key not in prefixes and key not in new_keys:
                need += self.cache.blocks_for(image_len)
            if need > free:
                break
            free -= need
            new_keys.add(key)
            waiting.popleft()
            admitted.append((idx, req, max_new, total, free_slots.take()))
        return admitted

    def _prefill(self, admitted, prefixes, waiting, selector: Selector, state: SlotState, seed: int,
                 text_only: bool) -> Tuple[List[_Running], torch.Tensor]:
        # images seen for the first time: one vision batch, one decoder pass over their tokens
        todo: Dict[Hashable, torch.Tensor] = {}
        for idx, req, *_ in admitted:
            key = self._key(idx, req)
            if key not in prefixes and key not in todo:
                todo[key] = req.pixel_values
        if todo and not text_only:
            pixels = torch.stack(list(todo.values())).to(self.device, self.dtype)
            prefixes.update(zip(todo, self.runner.encode_prefixes(self.model.encode_images(pixels))))
        elif todo:
            prefixes.update((key, self.cache.new_prefix(0)) for key in todo)
        # each request continues its image's prefix with its prompt
        new = []
        for idx, req, max_new, total, slot in admitted:
            seq = self.cache.start_sequence(prefixes[self._key(idx, req)], total)
            selector.start(slot, req.prompt, request_seed(seed, idx))
            new.append(_Running(idx, seq, slot, max_new))
        n_img = 0 if text_only else self.model.num_image_tokens
        logits = self.runner.prefill([r.seq for r in new], [req.prompt for _, req, *_ in admitted], n_img)
        rows = self.cache.staging.tensor([r.slot for r in new])
        chosen = selector.select(logits, rows)
        state.start(rows, [r.seq for r in new], [len(req.prompt) for _, req, *_ in admitted], chosen)
        # A started sequence holds its own references to the shared blocks, so a prefix is released
        # as soon as no waiting request (in the look-ahead window) uses the same image.
        waiting_keys = {self._key(i, q) for i, q in waiting}
        for key in {self._key(idx, req) for idx, req, *_ in admitted} - waiting_keys:
            self.cache.release_prefix(prefixes.pop(key))
        return new, chosen
