"""`gitfast.Captioner`: caption (or answer questions about) many images, in order, never crashing on one.

Data flow: inputs → `_prepare` (read, decode to RGB, the checkpoint's own processor, prompt token
ids; inline, or in `num_workers` worker processes running ahead of the model — `workers.py`) → on
CUDA, pinned host memory copied to the GPU a batch ahead on a side stream → the engine (`engine.py`: paged KV cache, continuous batching — new images are admitted as
others finish, so the batch stays full over a long input) → `CaptionResult`s in input order. An
input that cannot be read, decoded or preprocessed becomes a result with `.error` set, in its place;
the others carry on. The checkpoint is read once (`loading.load_checkpoint`'s steps); the engine runs its `GitModel`
directly. Beam search runs in batches of `max_batch_size` in the engine's lockstep mode (beams on the
same paged cache, sharing their image's blocks).
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .. import quantization
from ..checkpoint import loading
from ..defaults import EMBEDDED_MODEL
from ..devices import caption_dtype, resolve_device
from ..serving import stopping
from ..serving.engine import KeptEngine
from ..serving.generation import resolve_settings
from .records import Source
from .workers import Prepared, PreparePool, Preparer, PrepareSpec

ImageInput = Union[str, os.PathLike, Image.Image, Source, bytes, np.ndarray]


@dataclass(frozen=True)
class CaptionResult:
    source: str                     # the path, Source id, or "<image N>" for an in-memory image
    text: Optional[str]             # decoded caption/answer without special tokens or the prompt; None on error
    token_ids: Tuple[int, ...]      # generated ids after the prompt, without the final EOS or padding
    error: Optional[str] = None     # None, or why this input failed
    prompt: Optional[str] = None
    maps: Optional[torch.Tensor] = None  # with return_maps=True: [len(token_ids), grid_h, grid_w] (gitfast.explain.maps)

    @property
    def ok(self) -> bool:
        return self.error is None


class Captioner:
    """Captions images with a GIT checkpoint.

    model: None for gitfast's embedded default model, a checkpoint folder, or a hub id (downloaded on
        first use, only the files gitfast reads; `token`, `revision`, `cache_dir` and
        `local_files_only` as in transformers); not found → `CheckpointError`.
    device: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available, else the CPU.
    dtype: None/"float32" (tokens identical to transformers), "float16", "bfloat16" or "auto" (on the
        CPU: bfloat16 where the CPU has native bf16, else float32; devices.default_dtype).
    quantization_config: None, or "dynamic" for INT8 Linear layers on the CPU (gitfast.quantization).
    max_batch_size: images per model call.
    num_workers: 0 reads, decodes and preprocesses in this process, between model steps; N > 0 does
        it in N spawned worker processes (each loads the processor once) running up to
        `prefetch_batches` batches ahead, results in input order. Paths and picklable Sources go to
        the workers, PIL images are prepared here. Same pixels, same tokens either way. Call
        `close()` (or use `with`) to stop the workers before the Captioner is dropped.
        `preparer` (the inline `workers.Preparer`) and `pool` (the `workers.PreparePool`, None
        without workers) are public for tests and benchmarks.
    jpeg_draft: decode JPEGs at a power-of-two reduction that stays at or above the processor's
        resize target (`images.decode`). Faster on large photos, but not bit-exact: the processor
        resizes from a smaller picture, and a caption can change. Off by default.
    """

    def __init__(self, model: Union[str, os.PathLike, None] = None, *, device=None, dtype=None,
                 max_batch_size: int = 32, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                 token=None, local_files_only: bool = False, num_workers: int = 0, jpeg_draft: bool = False,
                 prefetch_batches: int = 2, quantization_config=None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if num_workers < 0 or prefetch_batches < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_batches >= 1, got {num_workers}, {prefetch_batches}")
        self.max_batch_size = max_batch_size
        self._engines = KeptEngine()  # the engine kept between calls, for greedy, sampling and beams
        self.device = resolve_device(device)
        if model is None and not EMBEDDED_MODEL.is_dir():
            raise loading.CheckpointError(f"the embedded default model is missing from this install ({EMBEDDED_MODEL}); "
                                          "pass a checkpoint folder or hub id")
        # load_checkpoint's steps, so that a video checkpoint is refused before its weights are read
        folder = loading.resolve(EMBEDDED_MODEL if model is None else model, revision=revision, cache_dir=cache_dir,
                                 token=token, local_files_only=local_files_only)
        self.folder, self.config = folder, loading.read_config(folder)  # no transformers import
        if (self.config.num_image_with_embedding or 1) > 1:
            raise loading.CheckpointError(f"{folder} is a video checkpoint (several frames per input); Captioner "
                                          "takes single images — use gitfast.GitForCausalLM.generate with 5-D pixel_values")
        self.processor = loading.load_processor(folder, self.config)
        dtype = caption_dtype(dtype, self.device, self.config)  # "auto": bf16 on CPUs with native bf16, else fp32
        self.model = loading.build_model(self.config, loading.read_weights(folder), dtype, self.device,
                                         origin=folder)  # a GitModel
        quantization.quantize(self.model, quantization_config)  # "dynamic": INT8 Linears (CPU only)
        self.generation_config = loading.read_generation_config(folder, self.config)
        self.tokenizer = self.processor.tokenizer
        cfg = self.config
        cls = self.tokenizer.cls_token_id
        self._bos = cls if cls is not None else cfg.bos_token_id
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
        self.num_workers, self.jpeg_draft = num_workers, jpeg_draft
        self.preparer = Preparer(self.processor, self._bos, cfg.max_position_embeddings, jpeg_draft)
        self.pool: Optional[PreparePool] = None
        if num_workers:
            spec = PrepareSpec(str(folder), self._bos, cfg.max_position_embeddings, jpeg_draft)
            self.pool = PreparePool(spec, num_workers, window=prefetch_batches * max_batch_size)
        self._prefetch = prefetch_batches * max_batch_size

    def worker_pids(self) -> List[int]:
        """The process ids of the running preparation workers (none before the first input, or inline)."""
        return self.pool.worker_pids() if self.pool is not None else []

    def close(self) -> None:
        """Stops the worker processes (a later call starts them again)."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- public API ------------------------------------------------------------------------------
    def caption(self, images: Union[ImageInput, Iterable[ImageInput]], prompts=None, *, max_new_tokens: int = 20,
                num_beams: int = 1, do_sample: bool = False, return_maps: bool = False,
                **generate_kwargs) -> List[CaptionResult]:
        """One result per input, in input order. `prompts`: None, one string for all, or one per image
        (None entries allowed) — each answered as transformers' GIT VQA examples do. With
        `do_sample=True`, pass `seed=N`: each input's sample depends only on N and its position, not
        on how inputs were batched."""
        items = _as_list(images)
        if prompts is not None and not isinstance(prompts, str):
            prompts = list(prompts)
            if len(prompts) != len(items):
                raise ValueError(f"{len(prompts)} prompts for {len(items)} images; pass one per image or one for all")
        return list(self.caption_iter(items, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                      do_sample=do_sample, return_maps=return_maps, **generate_kwargs))

    def caption_iter(self, images: Iterable[ImageInput], prompts=None, *, max_new_tokens: int = 20,
                     num_beams: int = 1, do_sample: bool = False, return_maps: bool = False,
                     **generate_kwargs) -> Iterator[CaptionResult]:
        """Streaming `caption`: reads lazily, yields results in input order a batch at a time.
        `return_maps=True`: each result's `.maps` says where each generated token looked (`with_maps.py`)."""
        settings = dict(generate_kwargs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample)
        self._check_settings(settings)
        if prompts is None or isinstance(prompts, str):
            self._check_prompt(prompts, max_new_tokens)
            pairs = ((image, prompts) for image in _as_iter(images))
        else:
            pairs = zip(_as_iter(images), prompts, strict=True)
        if return_maps:
            from .with_maps import captioned_with_maps
            return captioned_with_maps(self, pairs, settings)
        return self._results(pairs, settings)

    # --- pipeline --------------------------------------------------------------------------------
    def _results(self, pairs, settings, tap=None) -> Iterator[CaptionResult]:
        """`tap(prepared)`, if given, sees each `Prepared` before the model takes it (`with_maps.py`)."""
        if settings.get("num_beams", 1) == 1:
            return self._results_engine(pairs, settings, tap)
        return self._results_batched(pairs, settings, tap)

    def _engine(self, rows: Optional[int] = None):
        """The engine kept between calls, for `rows` sequences at once (default max_batch_size); rebuilt
        only when a call needs more. Its per-row state and KV cache follow `rows`, so a huge
        max_batch_size over a few inputs costs what those inputs need."""
        return self._engines.get(self.model, self.max_batch_size if rows is None else rows)

    def _results_engine(self, pairs, settings, tap=None) -> Iterator[CaptionResult]:
        """Continuous batching over the whole input; results leave in input order (a reorder buffer).
        Sizing the engine and refusing an impossible request (`KVCacheTooSmall`) happen here, at the
        call, before any result is asked for (so before an output is opened)."""
        kwargs = {k: v for k, v in settings.items() if k not in ("num_beams", "seed")}
        s = resolve_settings(self.generation_config, 1, **kwargs)
        # the engine is sized by what is queued: at most max_batch_size, at most the inputs there are
        head = list(itertools.islice(pairs, self.max_batch_size))
        rows, pairs = max(1, len(head)), itertools.chain(head, pairs)
        engine = self._engine(rows)
        engine.check_fits(s)
        return self._engine_results(engine, pairs, settings, s, rows, tap)

    def _engine_results(self, engine, pairs, settings, s, rows, tap) -> Iterator[CaptionResult]:
        from ..serving.engine import Request

        eos = self._eos_ids(settings)
        finished: Dict[int, CaptionResult] = {}   # reorder buffer
        by_request: Dict[int, Prepared] = {}      # engine request index -> prepared input, until it finishes
        issued = itertools.count()                # the engine numbers requests in the order it takes them

        def requests():
            prepared = self._prepared(pairs, settings, tap)
            if self.device.type == "cuda":
                prepared = _to_device_ahead(prepared, self.device, rows)
            for p in prepared:
                if p.error is not None:
                    finished[p.index] = CaptionResult(p.source, None, (), p.error, p.prompt)
                    continue
                by_request[next(issued)] = p
                pixels, p.pixel_values = p.pixel_values[0], None  # the engine's until prefill, then freed
                yield Request(pixels, p.prompt_ids, max_new_tokens=settings["max_new_tokens"])

        next_index = 0
        for out in engine.run(requests(), s, seed=settings.get("seed", 0)):
            p = by_request.pop(out.index)
            ids = stopping.until_eos(out.token_ids, eos)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            finished[p.index] = CaptionResult(p.source, text, tuple(ids), None, p.prompt)
            while next_index in finished:
                yield finished.pop(next_index)
                next_index += 1
        while next_index in finished:  # trailing error records
            yield finished.pop(next_index)
            next_index += 1

    def _results_batched(self, pairs, settings, tap=None) -> Iterator[CaptionResult]:
        stream = self._prepared(pairs, settings, tap)
        while True:
            prepared = list(itertools.islice(stream, self.max_batch_size))
            if not prepared:
                return
            good = [p for p in prepared if p.error is None]
            outputs = dict(zip((p.index for p in good), self._run_batch(good, settings))) if good else {}
            for p in prepared:
                if p.error is not None:
                    yield CaptionResult(p.source, None, (), p.error, p.prompt)
                else:
                    ids = outputs[p.index]
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    yield CaptionResult(p.source, text, tuple(ids), None, p.prompt)

    def _prepared(self, pairs, settings, tap=None) -> Iterator[Prepared]:
        """Every input read, decoded and preprocessed (`workers.Preparer`), in order: lazily here, or
        by the worker pool running ahead."""
        numbered = ((i, image, prompt) for i, (image, prompt) in enumerate(pairs))
        if self.pool is None:
            stream = (self.preparer(*item, settings["max_new_tokens"]) for item in numbered)
        else:
            stream = self.pool.map(numbered, settings["max_new_tokens"], self.preparer)
        return stream if tap is None else map(tap, stream)

    def _run_batch(self, batch: Sequence[Prepared], settings) -> List[List[int]]:
        """Beam search over one batch, in the kept engine's lockstep mode: generated ids per row, after
        the prompt, cut before the first EOS. Prompts of different lengths are left-padded and masked;
        the model is batch invariant, so each row's tokens equal that input run alone."""
        from ..serving.engine import Lockstep, Request

        width = max(len(p.prompt_ids) for p in batch)
        s = resolve_settings(self.generation_config, width, **{k: v for k, v in settings.items() if k != "seed"})
        requests = [Request(p.pixel_values[0], p.prompt_ids) for p in batch]
        outs = self._engine(len(batch)).generate(requests, s, lockstep=Lockstep(copies=s.num_beams))
        eos = self._eos_ids(settings)
        return [stopping.until_eos(o.token_ids, eos) for o in outs]

    def _eos_ids(self, settings) -> set:
        """Where a result is cut: the call's `eos_token_id`, else the generation config's, else the
        model config's (a checkpoint whose generation config names no EOS still ends captions there)."""
        return set(stopping.eos_ids(settings.get("eos_token_id"), self.generation_config.eos_token_id,
                                    self.config.eos_token_id))

    def _check_settings(self, settings):
        if settings.get("num_return_sequences", 1) != 1:
            raise ValueError("Captioner returns one result per input; num_return_sequences must be 1")
        n = settings["max_new_tokens"]
        if not isinstance(n, int) or n < 1 or n + 1 > self.config.max_position_embeddings:
            raise ValueError(f"max_new_tokens must be between 1 and {self.config.max_position_embeddings - 1}, "
                             f"got {n}")
        if settings["num_beams"] < 1:
            raise ValueError(f"num_beams must be at least 1, got {settings['num_beams']}")

    def _check_prompt(self, prompt: Optional[str], max_new_tokens: int) -> None:
        check_prompt_length(len(self.preparer.prompt_ids(prompt)), max_new_tokens, self.config)


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, config) -> None:
    """One prompt for every input: too long for the model is one error up front, not one per input."""
    if prompt_tokens + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_new_tokens={max_new_tokens} "
                         f"exceeds the model's {config.max_position_embeddings} text positions")


def _to_device_ahead(items: Iterator[Prepared], device: torch.device, depth: int) -> Iterator[Prepared]:
    """Copies each input's pixels to the GPU `depth` inputs before the engine takes it: from pinned
    memory, non-blocking, on a side stream, so the next batch's copies overlap this batch's compute.
    The engine's stream waits on each copy's event (on the GPU, not the host). Untested on a GPU yet."""
    stream = torch.cuda.Stream(device)
    ahead: deque = deque()
    for item in items:
        ready = None
        if item.pixel_values is not None:
            with torch.cuda.stream(stream):
                item.pixel_values = item.pixel_values.pin_memory().to(device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
        ahead.append((item, ready))
        if len(ahead) > depth:
            yield _after_copy(*ahead.popleft(), device)
    while ahead:
        yield _after_copy(*ahead.popleft(), device)


def _after_copy(item: Prepared, ready, device) -> Prepared:
    if ready is not None:
        current = torch.cuda.current_stream(device)
        current.wait_event(ready)
        item.pixel_values.record_stream(current)  # allocated on the side stream, used on this one
    return item


def _is_single(images) -> bool:
    # encoded bytes and pixel arrays are iterable, but each is one image
    return isinstance(images, (str, os.PathLike, Image.Image, Source, bytes, bytearray, memoryview, np.ndarray))


def _as_list(images) -> list:
    return [images] if _is_single(images) else list(images)


def _as_iter(images) -> Iterator:
    return iter([images]) if _is_single(images) else iter(images)
