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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as PyTorch's own checks say."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def default_dtype(device) -> torch.dtype:
    """The dtype gitfast picks for `dtype="auto"` on a CPU (`caption_dtype`; elsewhere "auto" is the
    checkpoint's saved dtype): bfloat16 on a CPU with native bf16 (faster than fp32 there, captions
    agreeing with fp32's as often as transformers' bf16 ones do; measured in bench/RESULTS.md, "CPU:
    fp32 / bf16 / INT8"); float32 on other CPUs (emulated bf16 is slower than fp32). For a CUDA
    device it answers float32, the bit-exact choice."""
    dev = torch.device(device)
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_native_bf16() else torch.float32


def caption_dtype(dtype, device, config=None) -> torch.dtype:
    """The weights' dtype a Captioner on `device` runs for `dtype`: "auto" is `default_dtype` on the
    CPU and the checkpoint's saved dtype elsewhere; anything else as `resolve_dtype` reads it."""
    if dtype == "auto" and resolve_device(device).type == "cpu":
        return default_dtype("cpu")
    return resolve_dtype(dtype, config)


def placement(module: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where a model's weights live and in which dtype (its first parameter's)."""
    p = next(module.parameters())
    return p.device, p.dtype
