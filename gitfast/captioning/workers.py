"""Preparing inputs for the model — read, decode to RGB, the checkpoint's processor, prompt token ids —
in the calling process or in a pool of worker processes.

`Preparer` is the per-input job; `Captioner` runs it inline (`num_workers=0`) or through a
`PreparePool`: `num_workers` spawned processes, each loading the processor once from the checkpoint
folder. The pool is an ordered, bounded prefetching iterator: at most `window` inputs are in flight
(submitted, or done and not yet taken), so the workers run ahead of the model while memory stays
flat however long the input; inputs travel in chunks of a few per task. Paths and picklable
`Source`s go to the workers; PIL images and anything that does not pickle are prepared in the
calling process, in their place. Each task carries the parent's `PIL.Image.MAX_IMAGE_PIXELS`, the
decompression-bomb limit. A worker process that dies (a decoder crash, the OOM killer) costs only
the input that killed it: the pool is restarted, the inputs that were in flight are retried one at a
time, and the one that kills a worker again becomes an error record.

Transport: workers return pixel values as float32 numpy arrays, pickled through the result pipe.
Sending torch tensors instead (torch's shared-memory reduction: a file descriptor per tensor) was
measured slower for 224×224 images (see `bench/bench_pipeline.py`). Preprocessing is exactly the
in-process code, so the pixels are bit-identical either way.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from . import images as imaging
from .records import Source

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    index: int
    source: str
    prompt: Optional[str]
    pixel_values: Optional[torch.Tensor] = None  # [1, 3, H, W] float32, the processor's output
    prompt_ids: Optional[List[int]] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class PrepareSpec:
    """What a worker process needs to build its own `Preparer` (picklable)."""
    folder: str                 # checkpoint folder holding the processor files
    bos: int                    # the id that starts every prompt ([CLS])
    max_positions: int          # the model's text positions
    jpeg_draft: bool = False


class Preparer:
    """read → decode → processor → prompt ids for one input; the same code inline and in workers.
    `processor`: the checkpoint's `gitfast.checkpoint.processor.Processor` (`loading.load_processor`)."""

    def __init__(self, processor, bos: int, max_positions: int, jpeg_draft: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.bos = bos
        self.max_positions = max_positions
        self.draft = draft_size(processor.image_processor) if jpeg_draft else None
        self._prompt_cache: Dict[str, List[int]] = {}

    @classmethod
    def from_spec(cls, spec: PrepareSpec) -> "Preparer":
        from ..checkpoint.loading import load_processor

        return cls(load_processor(Path(spec.folder)), spec.bos, spec.max_positions, spec.jpeg_draft)

    def __call__(self, index: int, image, prompt: Optional[str], max_new_tokens: int) -> Prepared:
        item = Prepared(index, label(image, index), prompt)
        item.prompt_ids = self.prompt_ids(prompt)
        if len(item.prompt_ids) + max_new_tokens > self.max_positions:
            item.error = (f"prompt of {len(item.prompt_ids)} tokens plus max_new_tokens={max_new_tokens} "
                          f"exceeds the model's {self.max_positions} text positions")
            return item
        try:
            rgb = load_rgb(image, self.draft)
        except imaging.ImageError as exc:
            item.error = str(exc)
            return item
        try:
            item.pixel_values = self.processor.pixel_values(rgb)
        except Exception as exc:  # the processor rejects odd images in various ways; it is this input's failure
            item.error = f"preprocessing failed: {type(exc).__name__}: {exc}"
        return item

    def prompt_ids(self, prompt: Optional[str]) -> List[int]:
        # as transformers' GIT VQA examples: [CLS] + the prompt's tokens, no [SEP]
        if not prompt:
            return [self.bos]
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = [self.bos] + self.tokenizer(prompt, add_special_tokens=False).input_ids
        return self._prompt_cache[prompt]


def draft_size(image_processor) -> Optional[Tuple[int, int]]:
    """The smallest (width, height) a JPEG may be draft-decoded to so that the processor's resize still
    starts from at least its target size; None when the processor's size is not understood."""
    size = getattr(image_processor, "size", None) or {}
    if not hasattr(size, "get"):
        return None
    side = size.get("shortest_edge") or max(size.get("height") or 0, size.get("width") or 0)
    return (int(side), int(side)) if side else None


def load_rgb(image, draft: Optional[Tuple[int, int]] = None) -> Image.Image:
    if isinstance(image, Image.Image):
        return imaging.to_rgb(image)
    if isinstance(image, Source):
        try:
            data = image.open_bytes()
        except OSError as exc:
            raise imaging.ImageError(f"cannot read: {exc.strerror or exc}") from None
        return imaging.decode(data, draft)
    if isinstance(image, (str, os.PathLike)):
        return imaging.read(image, draft)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return imaging.decode(bytes(image), draft)
    if isinstance(image, np.ndarray):
        return imaging.from_array(image)
    raise imaging.ImageError(f"unsupported input type {type(image).__name__}; pass a path, a PIL image, encoded "
                             "bytes, a pixel array or a Source")


def label(image, index: int) -> str:
    if isinstance(image, Source):
        return image.id
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"<image {index}>"


# --- worker side ---------------------------------------------------------------------------------
_worker: Optional[Preparer] = None


def _init_worker(spec: PrepareSpec) -> None:
    global _worker
    torch.set_num_threads(1)  # one core per worker; the processor's work is per image
    _worker = Preparer.from_spec(spec)


def _ping() -> bool:
    return _worker is not None


def _prepare_in_worker(max_image_pixels: Optional[int], chunk: List[tuple]) -> List[Prepared]:
    Image.MAX_IMAGE_PIXELS = max_image_pixels  # the parent's decompression-bomb limit, as it is now
    out = [_worker(*args) for args in chunk]
    for item in out:
        if item.pixel_values is not None:
            item.pixel_values = item.pixel_values.numpy()  # plain pickle through the pipe (see module docstring)
    return out


def _received(item: Prepared) -> Prepared:
    if isinstance(item.pixel_values, np.ndarray):
        item.pixel_values = torch.from_numpy(item.pixel_values)
    return item


# --- main side -----------------------------------------------------------------------------------
class PreparePool:
    """`num_workers` spawned processes running `Preparer`s; `map` yields results in input order."""

    def __init__(self, spec: PrepareSpec, num_workers: int, window: int, chunk: Optional[int] = None):
        if num_workers < 1:
            raise ValueError(f"a PreparePool needs at least one worker, got {num_workers}")
        self.spec, self.num_workers, self.window = spec, num_workers, max(window, 2 * num_workers)
        # inputs per task: one task per input costs a wake-up of the executor's thread, which waits for
        # the GIL behind the model (~5 ms switch interval); chunks amortise it
        self.chunk = chunk or max(1, min(16, self.window // (2 * num_workers)))
        self._executor: Optional[ProcessPoolExecutor] = None
        self.restarts = 0  # worker pools lost to a dead worker (for tests and logs)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            executor = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(self.spec,))
            try:  # a pool that cannot start is an error, not a dead worker to blame on each input
                executor.submit(_ping).result()
            except BrokenProcessPool:
                executor.shutdown(wait=True)
                raise RuntimeError("the preparation worker processes failed to start (their error is on stderr); "
                                   "with num_workers > 0 the main module must be importable: guard a script's "
                                   "top level with `if __name__ == '__main__':`") from None
            self._executor = executor
        return self._executor

    def _restart(self) -> None:
        self.restarts += 1
        log.warning("a preparation worker died; restarting the pool and retrying its inputs one at a time")
        self.close()

    def worker_pids(self) -> List[int]:
        """The process ids of the running workers (none until the pool has started)."""
        # ProcessPoolExecutor keeps no public list of its processes
        return list(self._executor._processes) if self._executor is not None else []

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, items: Iterable[Tuple[int, object, Optional[str]]], max_new_tokens: int,
            local: Preparer) -> Iterator[Prepared]:
        """(index, image, prompt) → Prepared, in order. `local` prepares what cannot travel."""
        pending: Deque[list] = deque()  # [task args, Future of a chunk's results, or the results themselves]
        chunk: List[tuple] = []
        in_flight = 0
        source = iter(items)

        def flush():
            if chunk:
                pending.append([list(chunk), self._submit(chunk)])
                chunk.clear()

        try:
            while True:
                while in_flight < self.window:
                    nxt = next(source, None)
                    if nxt is None:
                        break
                    args, in_flight = (*nxt, max_new_tokens), in_flight + 1
                    if _portable(nxt[1]):
                        chunk.append(args)
                        if len(chunk) == self.chunk:
                            flush()
                    else:
                        flush()  # keeps the order
                        pending.append([[args], [local(*args)]])
                flush()
                if not pending:
                    return
                if isinstance(pending[0][1], Future):
                    self._resolve(pending)
                for item in pending.popleft()[1]:
                    in_flight -= 1
                    yield item
        finally:
            for _, job in pending:
                if isinstance(job, Future):
                    job.cancel()

    def _resolve(self, pending: Deque[list]) -> None:
        head = pending[0]
        try:
            head[1] = [_received(p) for p in head[1].result()]
        except BrokenProcessPool:
            # the pool failed every chunk in flight at once: rerun their inputs one at a time
            self._restart()
            for entry in pending:
                if isinstance(entry[1], Future) and _lost(entry[1]):
                    entry[1] = [self._retry_alone(args) for args in entry[0]]

    def _submit(self, chunk: List[tuple]) -> Future:
        try:
            return self._pool().submit(_prepare_in_worker, Image.MAX_IMAGE_PIXELS, list(chunk))
        except BrokenProcessPool:  # broken by an earlier input; its own future reports that
            future: Future = Future()
            future.set_exception(BrokenProcessPool("pool broken before submission"))
            return future

    def _retry_alone(self, args) -> Prepared:
        try:
            return _received(self._pool().submit(_prepare_in_worker, Image.MAX_IMAGE_PIXELS, [args]).result()[0])
        except BrokenProcessPool:
            self._restart()
            index, image, prompt, _ = args
            return Prepared(index, label(image, index), prompt,
                            error="a worker process died while preparing this input (crashed decoder or out of memory)")


def _lost(job: Future) -> bool:
    return isinstance(job.exception(), BrokenProcessPool)  # a broken pool fails all its futures at once


def _portable(image) -> bool:
    if isinstance(image, (str, os.PathLike)):
        return True
    if not isinstance(image, Source):
        return False  # PIL images (costly to ship, already decoded) and unsupported types stay here
    try:
        pickle.dumps(image)
    except Exception:  # a lambda or a local function as open_bytes
        return False
    return True
