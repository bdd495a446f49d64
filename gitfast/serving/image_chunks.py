"""How many images one vision-encoder or image-prefix pass takes on the CPU: few enough that no
activation outgrows glibc's mmap threshold.

glibc serves a block above its mmap threshold (32 MiB at most on 64-bit Linux) from a fresh mapping that
it unmaps on free, so a pass whose activations are larger page-faults them in again on every call. A
pass over 32 git-base images makes 6304 x 3072 MLP activations (77 MB in fp32, and again as INT8's int32
products): `gitfast caption --quantize dynamic` of 64 JPEGs on an AMD Zen 3 (2 threads) spent 6.4-7.2 s
of system time at batch 32, 1.3 s at batch 8, of about 38 s of CPU time. Rows are independent in every
op of these passes (MKL's GEMM gives bitwise the same rows at any row count), so chunks give the same
numbers as one pass. On a GPU the caching allocator has no such cost: one pass.
"""
from __future__ import annotations

from typing import Optional

import torch

TEMPORARY_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit


def per_pass(model, tokens_per_image: int, device) -> Optional[int]:
    """Images per pass on `device` whose widest activation (fp32 or int32) stays within TEMPORARY_BYTES;
    None: no limit."""
    if torch.device(device).type != "cpu":
        return None
    c, v = model.config, model.config.vision_config
    widest = max(c.intermediate_size, v.intermediate_size, 3 * c.hidden_size, 3 * v.hidden_size)
    return max(1, TEMPORARY_BYTES // (4 * max(1, tokens_per_image) * widest))


def encode_images(model, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """`model.encode_images` over `pixel_values` ([B, 3, H, W] or [B, frames, 3, H, W]), `per_pass`
    samples at a time."""
    patch = model.config.vision_config.patch_size
    frames = pixel_values.shape[1] if pixel_values.ndim == 5 else 1
    tokens = frames * ((pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch) + 1)
    n = per_pass(model, tokens, pixel_values.device)
    if n is None or pixel_values.shape[0] <= n:
        return model.encode_images(pixel_values, interpolate_pos_encoding)
    return torch.cat([model.encode_images(part, interpolate_pos_encoding) for part in pixel_values.split(n)])
