"""The contract between benchmark suites and the runner.

A suite is a module `bench/bench_<name>.py` with a function
`cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]`. It only builds inputs and
closures; the runner (`gitfast.bench.runner`) times every case the same way, measures the device
ceilings, and writes one row per case in the shared format. A provider that cannot run here is
still yielded, with `fn=None` and `skip_reason`, so it shows up as skipped rather than vanishing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Case:
    benchmark: str                      # suite name, e.g. "git_attention"
    shape: dict                         # e.g. {"batch": 256, "image": 197, "text": 20, "heads": 12, "head_dim": 64}
    provider: str                       # "gitfast", "torch", "torch.compile", "sdpa_mask", "sdpa_flash_nomask", "flex", "transformers"
    dtype: str                          # "float16", "bfloat16", "float32"
    fn: Optional[Callable[[], Any]]     # one call = one timed unit of work; None when skipped
    flops: Optional[float] = None       # useful FLOPs of one call (for TFLOP/s), if meaningful
    bytes: Optional[float] = None       # bytes one call must move at minimum (for TB/s), if meaningful
    skip_reason: Optional[str] = None
    extra: dict = field(default_factory=dict)   # suite-specific fields copied into the row (e.g. images_per_s)
    label: str = ""                     # short shape label for tables and plots, e.g. "B256 197+20"
    # On CUDA, run once after timing: its peak device memory above what was already allocated is
    # recorded as peak_mem_gb (give it fresh state, e.g. a new engine, so caches it builds count).
    memory_fn: Optional[Callable[[], Any]] = None


def triton_skip_reason(device: str):
    """Why gitfast's Triton kernels cannot run on `device` here, or None when they can."""
    import os

    from gitfast.kernels.api import triton_available

    if not triton_available():
        return "Triton kernels need triton plus a CUDA device, or TRITON_INTERPRET=1 on CPU"
    if device != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton kernels on CPU only run under TRITON_INTERPRET=1"
    return None
