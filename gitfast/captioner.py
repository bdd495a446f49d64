"""`gitfast.Captioner`: caption (or answer questions about) many images, in order, never crashing on one.

Data flow: inputs → `_prepare` (read, decode to RGB, the checkpoint's own processor, prompt token
ids) → the engine (`engine.py`: paged KV cache, continuous batching — new images are admitted as
others finish, so the batch stays full over a long input) → `CaptionResult`s in input order. An
input that cannot be read, decoded or preprocessed becomes a result with `.error` set, in its place;
the others carry on. Beam search runs in batches of `max_batch_size` through `GitForCausalLM.generate`
(beams on the paged cache, sharing their image's blocks).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from . import images as imaging
from . import loading
from .defaults import EMBEDDED_MODEL
from .sources import Source

ImageInput = Union[str, os.PathLike, Image.Image, Source]


@dataclass(frozen=True)
class CaptionResult:
    source: str                     # the path, Source id, or "<image N>" for an in-memory image
    text: Optional[str]             # decoded caption/answer without special tokens or the prompt; None on error
    token_ids: Tuple[int, ...]      # generated ids after the prompt, without the final EOS or padding
    error: Optional[str] = None     # None, or why this input failed
    prompt: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Prepared:
    index: int
    source: str
    prompt: Optional[str]
    pixel_values: Optional[torch.Tensor] = None  # [1, (frames,) 3, H, W]
    prompt_ids: Optional[List[int]] = None
    error: Optional[str] = None


class Captioner:
    """Captions images with a GIT checkpoint.

    model: None for gitfast's embedded default model, a checkpoint folder, or a hub id already in
        the local Hugging Face cache (gitfast never downloads); not found → `CheckpointError`.
    device: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available, else the CPU.
    dtype: None/"float32" (tokens identical to transformers), "float16", "bfloat16" or "auto".
    max_batch_size: images per model call.
    """

    def __init__(self, model: Union[str, os.PathLike, None] = None, *, device=None, dtype=None,
                 max_batch_size: int = 32, revision: Optional[str] = None, cache_dir: Optional[str] = None):
        from transformers import AutoProcessor

        from .drop_in import GitForCausalLM

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.device = _resolve_device(device)
        name = EMBEDDED_MODEL if model is None else model
        if model is None and not EMBEDDED_MODEL.is_dir():
            raise loading.CheckpointError(f"the embedded default model is missing from this install ({EMBEDDED_MODEL}); "
                                          "pass a checkpoint folder or hub id")
        folder = loading.resolve(name, revision=revision, cache_dir=cache_dir)
        if (loading.load_config(folder).num_image_with_embedding or 1) > 1:
            raise loading.CheckpointError(f"{folder} is a video checkpoint (several frames per input); Captioner takes "
                                          "single images — use gitfast.GitForCausalLM.generate with 5-D pixel_values")
        self.model = GitForCausalLM.from_pretrained(folder, dtype=dtype, device=self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as exc:
            raise loading.CheckpointError(
                f"{folder} has no usable GIT processor (preprocessor_config.json and tokenizer files): {exc}") from exc
        if not hasattr(self.processor, "tokenizer") or not hasattr(self.processor, "image_processor"):
            raise loading.CheckpointError(f"{folder} holds a {type(self.processor).__name__}, not a GitProcessor "
                                          "(image processor + tokenizer)")
        self.tokenizer = self.processor.tokenizer
        cfg = self.model.config
        cls = self.tokenizer.cls_token_id
        self._bos = cls if cls is not None else cfg.bos_token_id
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
        self._prompt_cache: Dict[str, List[int]] = {}

    # --- public API ------------------------------------------------------------------------------
    def caption(self, images: Union[ImageInput, Iterable[ImageInput]], prompts=None, *, max_new_tokens: int = 20,
                num_beams: int = 1, do_sample: bool = False, **generate_kwargs) -> List[CaptionResult]:
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
                                      do_sample=do_sample, **generate_kwargs))

    def caption_iter(self, images: Iterable[ImageInput], prompts=None, *, max_new_tokens: int = 20,
                     num_beams: int = 1, do_sample: bool = False, **generate_kwargs) -> Iterator[CaptionResult]:
        """Streaming `caption`: reads lazily, yields results in input order a batch at a time."""
        settings = dict(generate_kwargs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample)
        self._check_settings(settings)
        if prompts is None or isinstance(prompts, str):
            pairs = ((image, prompts) for image in _as_iter(images))
        else:
            pairs = zip(_as_iter(images), prompts, strict=True)
        return self._results(pairs, settings)

    # --- pipeline --------------------------------------------------------------------------------
    def _results(self, pairs, settings) -> Iterator[CaptionResult]:
        if settings.get("num_beams", 1) == 1:
            return self._results_engine(pairs, settings)
        return self._results_batched(pairs, settings)

    def _engine(self):
        from .engine import Engine

        if getattr(self, "_engine_obj", None) is None:
            self._engine_obj = Engine(self.model.model, max_batch_size=self.max_batch_size)
        return self._engine_obj

    def _results_engine(self, pairs, settings) -> Iterator[CaptionResult]:
        """Continuous batching over the whole input; results leave in input order (a reorder buffer)."""
        from .engine import Request
        from .generation import resolve_settings

        kwargs = {k: v for k, v in settings.items() if k not in ("num_beams", "seed")}
        s = resolve_settings(self.model.generation_config, 1, **kwargs)
        eos = self._eos_ids(settings)
        finished: Dict[int, CaptionResult] = {}
        by_request: List[_Prepared] = []   # engine request index -> prepared input

        def requests():
            for i, (image, prompt) in enumerate(pairs):
                p = self._prepare(i, image, prompt, settings)
                if p.error is not None:
                    finished[i] = CaptionResult(p.source, None, (), p.error, p.prompt)
                    continue
                by_request.append(p)
                yield Request(p.pixel_values[0], p.prompt_ids, max_new_tokens=settings["max_new_tokens"])

        next_index = 0
        for out in self._engine().run(requests(), s, seed=settings.get("seed", 0)):
            p = by_request[out.index]
            ids = out.token_ids
            ids = ids[:next((j for j, t in enumerate(ids) if t in eos), len(ids))]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            finished[p.index] = CaptionResult(p.source, text, tuple(ids), None, p.prompt)
            while next_index in finished:
                yield finished.pop(next_index)
                next_index += 1
        while next_index in finished:  # trailing error records
            yield finished.pop(next_index)
            next_index += 1

    def _results_batched(self, pairs, settings) -> Iterator[CaptionResult]:
        numbered = enumerate(pairs)
        while True:
            chunk = list(itertools.islice(numbered, self.max_batch_size))
            if not chunk:
                return
            prepared = [self._prepare(i, image, prompt, settings) for i, (image, prompt) in chunk]
            good = [p for p in prepared if p.error is None]
            outputs = dict(zip((p.index for p in good), self._run_batch(good, settings))) if good else {}
            for p in prepared:
                if p.error is not None:
                    yield CaptionResult(p.source, None, (), p.error, p.prompt)
                else:
                    ids = outputs[p.index]
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    yield CaptionResult(p.source, text, tuple(ids), None, p.prompt)

    def _prepare(self, index: int, image: ImageInput, prompt: Optional[str], settings) -> _Prepared:
        """Everything per input before the model: the future worker-process job."""
        item = _Prepared(index, _label(image, index), prompt)
        item.prompt_ids = self._prompt_ids(prompt)
        max_pos = self.model.config.max_position_embeddings
        if len(item.prompt_ids) + settings["max_new_tokens"] > max_pos:
            item.error = (f"prompt of {len(item.prompt_ids)} tokens plus max_new_tokens={settings['max_new_tokens']} "
                          f"exceeds the model's {max_pos} text positions")
            return item
        try:
            rgb = _load_rgb(image)
        except imaging.ImageError as exc:
            item.error = str(exc)
            return item
        try:
            item.pixel_values = self.processor(images=rgb, return_tensors="pt").pixel_values
        except Exception as exc:  # the processor rejects odd images in various ways; it is this input's failure
            item.error = f"preprocessing failed: {type(exc).__name__}: {exc}"
        return item

    def _prompt_ids(self, prompt: Optional[str]) -> List[int]:
        # as transformers' GIT VQA examples: [CLS] + the prompt's tokens, no [SEP]
        if not prompt:
            return [self._bos]
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = [self._bos] + self.tokenizer(prompt, add_special_tokens=False).input_ids
        return self._prompt_cache[prompt]

    def _run_batch(self, batch: Sequence[_Prepared], settings) -> List[List[int]]:
        # Prompts of different lengths are left-padded and masked; the model is batch invariant, so
        # each row's tokens equal that input run alone.
        width = max(len(p.prompt_ids) for p in batch)
        input_ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            input_ids[row, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            attention_mask[row, width - len(p.prompt_ids):] = 1
        pixel_values = torch.cat([p.pixel_values for p in batch])
        return self._generate(pixel_values, input_ids, attention_mask, settings)

    def _generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  settings: dict) -> List[List[int]]:
        """The one model call: generated ids per row, after the prompt, cut before the first EOS."""
        out = self.model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                  **{k: v for k, v in settings.items() if k != "seed"})
        eos = self._eos_ids(settings)
        rows = []
        for seq in out[:, input_ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(seq) if t in eos), len(seq))
            rows.append(seq[:cut])
        return rows

    def _eos_ids(self, settings) -> set:
        eos = settings.get("eos_token_id")
        if eos is None:
            eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())

    def _check_settings(self, settings):
        if settings.get("num_return_sequences", 1) != 1:
            raise ValueError("Captioner returns one result per input; num_return_sequences must be 1")
        n = settings["max_new_tokens"]
        if not isinstance(n, int) or n < 1 or n + 1 > self.model.config.max_position_embeddings:
            raise ValueError(f"max_new_tokens must be between 1 and {self.model.config.max_position_embeddings - 1}, "
                             f"got {n}")
        if settings["num_beams"] < 1:
            raise ValueError(f"num_beams must be at least 1, got {settings['num_beams']}")


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


def _load_rgb(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return imaging.to_rgb(image)
    if isinstance(image, Source):
        try:
            data = image.open_bytes()
        except OSError as exc:
            raise imaging.ImageError(f"cannot read: {exc.strerror or exc}") from None
        return imaging.decode(data)
    if isinstance(image, (str, os.PathLike)):
        return imaging.read(image)
    raise imaging.ImageError(f"unsupported input type {type(image).__name__}; pass a path, a PIL image or a Source")


def _label(image, index: int) -> str:
    if isinstance(image, Source):
        return image.id
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"<image {index}>"


def _is_single(images) -> bool:
    return isinstance(images, (str, os.PathLike, Image.Image, Source))


def _as_list(images) -> list:
    return [images] if _is_single(images) else list(images)


def _as_iter(images) -> Iterator:
    return iter([images]) if _is_single(images) else iter(images)
