"""A GIT checkpoint's processor — its tokenizer and its image preprocessing — loaded without transformers'
processing stack.

Every transformers image processor module imports `transformers.processing_utils`, which imports
`modeling_utils` and through it `torch.distributed.tensor`, torch._dynamo, sympy and scipy: seconds of
start-up for a few milliseconds of image work. GIT checkpoints name one image processor, CLIP's
(resize the shortest edge, bicubic; center crop; rescale; normalize), which `ClipPixels` computes
with the very operations of transformers' PIL backend (`CLIPImageProcessorPil`, what `AutoProcessor`
builds when torchvision is not installed), so the pixels are bit-identical (tests/test_processor.py
holds transformers' processor as the reference). Anything else — another processor type, settings
`ClipPixels` does not reproduce, or torchvision installed (transformers then resizes with torchvision,
other pixels) — is left to transformers' own `AutoImageProcessor`. The tokenizer is
`bert_tokenizer.BertWordPiece` (the `tokenizers` library directly, as transformers' BertTokenizer
builds it) where the checkpoint's tokenizer files hold settings it reproduces, else transformers'
`AutoTokenizer`; with the config reader (`config_reader.py`) the Captioner then never imports transformers.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .bert_tokenizer import BertWordPiece

log = logging.getLogger(__name__)

PREPROCESSOR_FILE, PROCESSOR_FILE = "preprocessor_config.json", "processor_config.json"
# what `CLIPImageProcessor` assumes where preprocessor_config.json is silent (transformers.image_utils)
_CLIP_DEFAULTS = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": Image.Resampling.BICUBIC,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}
# the settings ClipPixels reads; any other (use_square_size, default_to_square, do_pad, ...) may change
# what transformers computes, so its presence leaves the checkpoint to transformers
_CLIP_KEYS = set(_CLIP_DEFAULTS) | {"image_processor_type", "feature_extractor_type", "processor_class"}
_CLIP_NAMES = {("image_processor_type", "CLIPImageProcessor"), ("image_processor_type", "CLIPImageProcessorPil"),
               ("feature_extractor_type", "CLIPFeatureExtractor")}


class ClipPixels:
    """CLIP preprocessing of an RGB PIL image: [1, 3, crop, crop] float32, bit-identical to transformers'
    `CLIPImageProcessorPil`. Built only by `clip_pixels` for settings it reproduces; `size`, `crop_size`,
    `do_resize` and `do_center_crop` read as on transformers' image processor (`loading.check_processor`,
    `workers.draft_size`)."""

    def __init__(self, shortest_edge: int, crop: Tuple[int, int], resample: int, rescale_factor: float,
                 mean: Sequence[float], std: Sequence[float]):
        self.do_resize, self.do_center_crop = True, True
        self.size = {"shortest_edge": shortest_edge}
        self.crop_size = {"height": crop[0], "width": crop[1]}
        self.resample, self.rescale_factor = resample, rescale_factor
        self.mean = np.array(mean, dtype=np.float32)[:, None, None]
        self.std = np.array(std, dtype=np.float32)[:, None, None]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(f"ClipPixels takes RGB images (images.to_rgb), not {image.mode}")
        pixels = np.asarray(self._resized(image)).transpose(2, 0, 1)  # H x W x 3 -> 3 x H x W, uint8
        pixels = np.ascontiguousarray(self._cropped(pixels))
        # transformers' rescale: float64 product, then float32; normalize in float32 (image_transforms)
        scaled = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return torch.from_numpy((scaled - self.mean) / self.std)[None]

    def _resized(self, image: Image.Image) -> Image.Image:
        # transformers' get_resize_output_image_size(default_to_square=False): the long side truncated
        short_side = self.size["shortest_edge"]
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(short_side * long / short)
        new_w, new_h = (short_side, new_long) if width <= height else (new_long, short_side)
        return image.resize((new_w, new_h), resample=self.resample, reducing_gap=None)

    def _cropped(self, pixels: np.ndarray) -> np.ndarray:
        # crop <= shortest edge (clip_pixels checks it), so never the padding branch of transformers' center_crop
        height, width = pixels.shape[1:]
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return pixels[:, top:top + crop_h, left:left + crop_w]


def clip_pixels(settings: dict) -> Optional[ClipPixels]:
    """A `ClipPixels` for preprocessor_config.json's `settings`, or None where it would not give
    transformers' pixels (another processor, a setting it does not reproduce, torchvision installed)."""
    if not any(settings.get(key) == name for key, name in _CLIP_NAMES) or not set(settings) <= _CLIP_KEYS:
        return None
    if importlib.util.find_spec("torchvision") is not None:
        return None  # transformers would pick its torchvision backend: other resize arithmetic
    s = {**_CLIP_DEFAULTS, **settings}
    if not all(s[flag] is True for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize",
                                            "do_convert_rgb")):
        return None
    shortest, crop = _shortest_edge(s["size"]), _crop(s["crop_size"])
    if shortest is None or crop is None or max(crop) > shortest or min(crop) < 1:
        return None
    mean, std = _per_channel(s["image_mean"]), _per_channel(s["image_std"])
    if mean is None or std is None or not _is_number(s["rescale_factor"]):
        return None
    if s["resample"] not in {int(r) for r in Image.Resampling}:
        return None
    return ClipPixels(shortest, crop, int(s["resample"]), s["rescale_factor"], mean, std)


def _shortest_edge(size: Any) -> Optional[int]:
    if isinstance(size, dict):
        size = size.get("shortest_edge") if set(size) == {"shortest_edge"} else None
    return size if _is_count(size) else None  # an int is transformers' old spelling of shortest_edge


def _crop(size: Any) -> Optional[Tuple[int, int]]:
    if _is_count(size):
        return size, size
    if isinstance(size, dict) and set(size) == {"height", "width"} and all(map(_is_count, size.values())):
        return size["height"], size["width"]
    return None


def _per_channel(values: Any) -> Optional[list]:
    if _is_number(values):
        return [values] * 3
    return values if isinstance(values, list) and len(values) == 3 and all(map(_is_number, values)) else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class Processor:
    """The checkpoint's tokenizer and image preprocessing. `image_processor` is a `ClipPixels`, or
    transformers' image processor where `ClipPixels` does not apply; `pixel_values` hides which."""
    tokenizer: Any
    image_processor: Any

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, H, W] float32 for one RGB image."""
        if isinstance(self.image_processor, ClipPixels):
            return self.image_processor(image)
        return self.image_processor(images=image, return_tensors="pt").pixel_values


def load(folder: Path) -> Processor:
    """The tokenizer and image preprocessing of the checkpoint in `folder`. OSError, ValueError or
    TypeError where its files are missing or unreadable (`loading.load_processor` words them)."""
    image_processor = clip_pixels(image_settings(folder))
    if image_processor is None:
        from transformers import AutoImageProcessor

        log.debug("%s: transformers' image processor (not one ClipPixels reproduces)", folder)
        image_processor = AutoImageProcessor.from_pretrained(str(folder))
    return Processor(load_tokenizer(folder), image_processor)


def load_tokenizer(folder: Path):
    """`BertWordPiece` where it reproduces the checkpoint's tokenizer, else transformers' `AutoTokenizer`."""
    tokenizer = BertWordPiece.load(folder)
    if tokenizer is None:
        from transformers import AutoTokenizer

        log.debug("%s: transformers' tokenizer (settings BertWordPiece does not reproduce)", folder)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer


def image_settings(folder: Path) -> dict:
    """The image processor's settings, where transformers looks for them: nested in
    processor_config.json (as transformers 5 saves a processor), else preprocessor_config.json."""
    nested = folder / PROCESSOR_FILE
    if nested.is_file():
        settings = _json_object(nested).get("image_processor")
        if settings is not None:
            return settings if isinstance(settings, dict) else {}
    if not (folder / PREPROCESSOR_FILE).is_file():
        raise OSError(f"no {PREPROCESSOR_FILE} (nor an image_processor in {PROCESSOR_FILE})")
    return _json_object(folder / PREPROCESSOR_FILE)


def _json_object(path: Path) -> dict:
    value = json.loads(path.read_text())  # JSONDecodeError is a ValueError
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} holds a {type(value).__name__}, not an object")
    return value
