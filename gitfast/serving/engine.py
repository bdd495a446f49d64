"""The engine: continuous batching of GIT requests over the paged KV cache.

Each iteration is "schedule -> run -> emit": the scheduler (`scheduler.py`, bookkeeping only)
admits waiting requests while the batch has room and the cache has free blocks for their whole
length, and takes those blocks (reserved up front, so a running sequence never runs out; a request
that would fit alone waits for blocks instead of failing); the executor (`executor.py`) encodes the
new images in one vision batch into prefixes shared by every request with the same `image_key`,
prefills the new prompts and decodes one token for every running sequence; the scheduler then takes
the tokens read back and retires finished sequences, freeing their blocks. Results are yielded as
they finish, tagged with the request's index; `generate` returns them in input order.

The host stays one step behind the device: a decode step's inputs come from device-side state
(`paged_runner.SlotState`), so step t+1 is queued before step t's tokens are read back (a non-blocking copy
waited for by event); a new sequence's first token, chosen by prefill, joins that readback and the
sequence decodes at once. Index tensors built on the host (slots, positions, block tables) reach the
device from pinned memory without a wait (`staging.HostStaging`), so admitting requests while others
decode never stalls the host either. The device never idles while Python does the bookkeeping; the price is one
discarded token for a sequence that ended with EOS at step t. Steps never run past a sequence's
`max_new_tokens`, so its reserved blocks always suffice.

That is the engine's continuous mode. Its lockstep mode (`run(..., lockstep=Lockstep(...))`,
`lockstep.py`) runs the same requests as one batch under transformers' exact loops (beam search, its
RNG stream, per-step scores), on blocks borrowed from the same cache under the same lock and lease:
every front end hands `Request`s to this one entry, and the engine keeps one cache set-up.

Greedy decoding gives the same tokens as transformers (per-row argmax over identically processed
scores). Sampling is seeded per request (`selection.request_seed`; its noise is a counter-based hash, see
`selection.py`), so it is reproducible and independent of batching, but it is not transformers'
global-RNG stream.
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from typing import Iterable, Iterator, List, Optional

import torch

from ..devices import placement
from .exclusive import Exclusive
from .executor import PlanExecutor
from .generation import Settings
from .lockstep import Lockstep, encode_images, run as run_lockstep
from .paged_cache import PagedKVCache
from .paged_runner import PagedRunner
from .scheduler import KVCacheTooSmall, Output, Request, Scheduler, kv_budget

# the request types live in scheduler.py, the lockstep mode in lockstep.py
__all__ = ["Engine", "KeptEngine", "KVCacheTooSmall", "Lockstep", "Output", "Request"]


class Engine:
    """Continuous batching over a paged KV cache.

    `kv_cache_bytes` fixes the cache size of continuous runs (they wait for blocks; a lockstep run,
    which holds all its rows at once, grows the pools to its need). Without it the cache is sized at
    the first run from that run's settings and the requests it has queued: min(max_batch_size,
    queued requests) rows at `max_length` text tokens, at least one sequence at the position table's
    end, capped at `gpu_memory_fraction` of the free device memory (of the available RAM on the CPU); a later run
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
        and by default, max_batch_size) can use, before the memory cap: `rows` rows of the settings'
        length, and never less than one request at the position table's end (a request's own
        `max_new_tokens` may go that far)."""
        rows = self.max_batch_size if rows is None else max(1, min(rows, self.max_batch_size))
        limit = self.model.config.max_position_embeddings
        return max(self._budget(self._text_tokens(settings), rows), self._budget(limit + 1, 1))

    def _budget(self, text_tokens: int, rows: int) -> int:
        return kv_budget(self.bytes_per_block, self.block_size, self.model.num_image_tokens, text_tokens, rows)

    def _text_tokens(self, settings: Settings) -> int:
        """Text tokens (prompt and new) a request of these settings holds, the position table's end at most."""
        return min(max(settings.max_length, 1) + 1, self.model.config.max_position_embeddings + 1)

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
        one = self._budget(self._text_tokens(settings), 1)
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
    def generate(self, requests: List[Request], settings: Settings, seed: int = 0,
                 lockstep: Optional[Lockstep] = None) -> List[Output]:
        """`run`'s outputs in input order."""
        outs: List[Optional[Output]] = [None] * len(requests)
        for out in self.run(requests, settings, seed, lockstep):
            outs[out.index] = out
        return outs  # type: ignore[return-value]

    @torch.inference_mode()
    def run(self, requests: Iterable[Request], settings: Settings, seed: int = 0,
            lockstep: Optional[Lockstep] = None) -> Iterator[Output]:
        """The engine's one entry: yields each request's output (`.index` says which).

        Continuous batching (`lockstep=None`; greedy, or sampling seeded per request by `seed`): each
        output as soon as its request finishes, in any order. `lockstep=Lockstep(...)`: the requests
        as one batch under transformers' exact loops (beam search, its RNG stream, per-step scores;
        `lockstep.py`), their outputs in input order when the batch is done.

        One run at a time: a run holds the engine until it is exhausted or closed (another thread's
        waits), and gives back all it took from the KV cache however it ends (`BlockAllocator.lease`)."""
        if settings.num_beams > 1 and lockstep is None:
            raise ValueError("beam search runs in lockstep: pass lockstep=Lockstep(copies=num_beams)")
        with self._running.hold():
            if lockstep is not None:
                yield from self._lockstep(list(requests), settings, lockstep)
                return
            numbered = iter(enumerate(requests))
            # the first window says how many rows this run can have at once
            first = deque(itertools.islice(numbered, self.max_batch_size))
            self._size_for(settings, len(first))
            if self.cache is None:  # nothing queued and no cache yet
                return
            with self.cache.allocator.lease():
                scheduler = Scheduler(numbered, settings, self.cache, max_rows=self.max_batch_size, waiting=first,
                                      image_tokens=self.model.num_image_tokens,
                                      positions=self.model.config.max_position_embeddings)
                yield from self._steps(scheduler, PlanExecutor(self.model, self.runner, settings, seed,
                                                               self.table_width))

    def _lockstep(self, requests: List[Request], settings: Settings, mode: Lockstep) -> Iterator[Output]:
        """A lockstep run: every row holds its blocks at once (no waiting can help), so the pools grow
        to the run's need when they are smaller, even past a fixed `kv_cache_bytes`."""
        if not requests:
            return
        images = encode_images(self.model, requests, mode.interpolate_pos_encoding)
        prompt_len = max(len(r.prompt) for r in requests) if mode.input_ids is None else mode.input_ids.shape[1]
        need = batch_budget(self.model, settings, len(requests) * mode.copies, images.tokens.shape[0], prompt_len,
                            images.tokens.shape[1], self.block_size)
        if need > self.held_bytes():
            self._allocate(need)
        with self.cache.allocator.lease():
            # decode steps eager, as transformers' loops are written (and as they ran on a cache of their own)
            yield from run_lockstep(PagedRunner(self.model, self.cache), requests, settings, mode, images)

    @staticmethod
    def _steps(scheduler: Scheduler, executor: PlanExecutor) -> Iterator[Output]:
        """Schedule -> run -> emit, until every request is out. A step's tokens are read back after
        the next step is launched (the module docstring says why)."""
        pending = None
        while (plan := scheduler.schedule()) is not None:
            launched = executor.run(plan)
            scheduler.ran(plan)
            if pending is not None:
                yield from scheduler.emit(executor.read(pending))
            pending = launched


def batch_budget(model, settings: Settings, rows: int, images: int, prompt_len: int,
                 image_tokens: Optional[int] = None, block_size: int = 16) -> int:
    """KV-cache bytes a batch holds at once (`scheduler.kv_budget`): `rows` sequences over `images`
    prefixes of `image_tokens` tokens (default the model's), each with room for the settings'
    `max_length` (or its longer prompt) and one token more. What a lockstep run takes, and what the
    drop-in sizes its kept engine with."""
    cfg = model.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_attention_heads,
                                             cfg.hidden_size // cfg.num_attention_heads, placement(model)[1])
    n_img = model.num_image_tokens if image_tokens is None else image_tokens
    return kv_budget(per_block, block_size, n_img, max(settings.max_length, prompt_len) + 1, rows, images)


class KeptEngine:
    """The engine a front end keeps between calls (the drop-in's `generate`, the `Captioner`),
    so its cache pools and CUDA graphs are reused: rebuilt only when a call needs more rows, or more
    than a fixed `kv_cache_bytes`, than it has, or the model moved. The old pools go before new ones
    are allocated."""

    def __init__(self):
        self.engine: Optional[Engine] = None

    def get(self, model, rows: int, kv_cache_bytes: Optional[int] = None, **options) -> Engine:
        """An engine over `model` for `rows` sequences at once (`options`: `Engine`'s other arguments)."""
        if not self._serves(model, rows, kv_cache_bytes):
            self.engine = None
            self.engine = Engine(model, max_batch_size=rows, kv_cache_bytes=kv_cache_bytes, **options)
        return self.engine

    def _serves(self, model, rows: int, kv_cache_bytes: Optional[int]) -> bool:
        e = self.engine
        return (e is not None and e.model is model and (e.device, e.dtype) == placement(model)
                and e.max_batch_size >= rows and (kv_cache_bytes is None or e.held_bytes() >= kv_cache_bytes))

    def free(self) -> None:
        """Lets the kept engine (its KV-cache pools and CUDA graphs) go."""
        self.engine = None
