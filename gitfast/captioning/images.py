"""Reading and decoding images into the RGB PIL images GIT's processor expects.

Every failure is an `ImageError` with a short reason, so that one bad file becomes one error record.
Conversion rules, applied in this order:

- Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) is enforced before decoding:
  an image over it is an error, never decoded. Setting the limit to None disables the check.
- EXIF orientation is applied (`ImageOps.exif_transpose`), so photos are seen upright.
- Transparency (RGBA, LA, PA, and P/L/RGB images with a transparent colour) is composited onto
  white — what transformers' own `convert_to_rgb` does — so a file gives the same pixels whether it
  is fed through gitfast or straight to the processor.
- 16-bit greyscale (I;16, I;16B, I;16L) and 32-bit integer greyscale (I) are scaled from 0..65535
  to 0..255; Pillow's plain conversion would clip every value above 255 to white.
- Everything else (L, 1, P, CMYK, YCbCr, F, ...) goes through Pillow's `convert("RGB")`.
- Multi-frame files (GIF, TIFF, WebP) give their first frame.

JPEG draft decoding (`draft=` in `decode`/`read`, off by default): libjpeg decodes straight to a
1/2, 1/4 or 1/8 scale, the largest reduction that keeps both sides at least the size asked for (the
processor's resize target), several times faster than a full decode. The processor then resizes
from a different (smaller) picture, so pixels — and sometimes captions — differ from a full decode;
`bench/bench_pipeline.py` measures how often.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

_WIDE_GREY = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ImageError(ValueError):
    """An input that cannot be read or decoded as an image; the message says why."""


def decode(data: bytes, draft: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Decodes encoded image bytes (any format Pillow reads) into an upright RGB image. `draft`
    (width, height): a JPEG may be decoded at a power-of-two reduction no smaller than this."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; we refuse from 1x on.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", draft)  # a no-op where no reduction keeps both sides >= draft
            image.load()  # decode now: truncated or corrupt data fails here, not later
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a possible decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image, or a format Pillow cannot read") from None
    # Pillow's decoders raise a wide range of types on corrupt data (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, ...); each one is just "this file is broken".
    except Exception as exc:
        raise ImageError(f"cannot decode image: {_reason(exc)}") from None
    return to_rgb(image)


def read(path: Union[str, os.PathLike], draft: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Reads and decodes an image file into an upright RGB image (`draft` as in `decode`)."""
    from .records import read_file

    try:
        data = read_file(path)  # regular files only, size-capped
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    return decode(data, draft)


def from_array(pixels: np.ndarray) -> Image.Image:
    """An RGB image from a uint8 array: H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA, onto white)."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise ImageError(f"a pixel array must be uint8 H x W, H x W x 3 or H x W x 4, not {pixels.dtype} "
                         f"{'x'.join(map(str, pixels.shape))}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright RGB copy of `image`, following the conversion rules in this module's docstring."""
    try:
        image.load()
        image = _upright(image)
        if image.mode == "RGB" and "transparency" not in image.info:
            return image
        if image.mode in _WIDE_GREY:
            grey = np.asarray(image).astype(np.float64).clip(0, 65535)
            return Image.fromarray(np.rint(grey / 257.0).astype(np.uint8), "L").convert("RGB")  # 65535 / 255 = 257
        if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # as in decode(): any decoder/conversion failure means this image is unusable
        raise ImageError(f"cannot convert {image.mode} image to RGB: {_reason(exc)}") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF is common in the wild; the pixels are still fine
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return image


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
