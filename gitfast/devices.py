"""Device and dtype names, resolved in one place for the drop-in, the Captioner, the CLI and bench."""
from __future__ import annotations

from typing import Tuple

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}
# device types gitfast runs on; anything else (mps, meta, xla, ...) is refused by name
DEVICE_TYPES = ("cpu", "cuda")


def resolve_dtype(dtype, config=None) -> torch.dtype:
    """None -> float32; a torch.dtype; a name from DTYPES; "auto" -> the checkpoint's saved dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return resolve_dtype(str(saved).replace("torch.", "")) if saved else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16 or 'auto'")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    """None/"auto" -> CUDA when available, else the CPU; a name or torch.device, checked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device {device!r} is not supported: gitfast runs on 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def placement(module: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where a model's weights live and in which dtype (its first parameter's)."""
    p = next(module.parameters())
    return p.device, p.dtype
