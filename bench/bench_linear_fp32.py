"""fp32 Linear layers at decode rows on the CPU: gitfast._C's linear_fp32 against F.linear (MKL).

One call is y = x W^T + b at git-base's decoder shapes (QKV 768 -> 2304, MLP 768 -> 3072 and
3072 -> 768) for 1 to 32 rows: a decode step of that many sequences reads each weight once, so the
weights rotate through copies larger than the last-level cache (as a step's 25 layers find them) and
bytes are the weight's. Quick mode: two shapes with odd sizes.

Providers: ``gitfast`` (``torch.ops.gitfast.linear_fp32``, the kernel ops.Linear takes at up to
``fp32_backends.NARROW_MAX_ROWS`` rows where it measured faster) and ``torch`` (``F.linear``).
For ratios on a shared CPU, interleave (bench/RESULTS.md, 2026-12-07, has the paired runs).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .common import Case
from .timing import copies_for, rotating

SUITE = "linear_fp32"


def _shapes(quick: bool):
    if quick:
        return [(1, 37, 70), (8, 77, 130)]
    return [(rows, k, n) for k, n in ((768, 3072), (3072, 768), (768, 2304)) for rows in (1, 2, 4, 8, 16, 32)]


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    from gitfast import ops

    dt = str(dtype).replace("torch.", "")
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        yield Case(SUITE, {}, "gitfast", dt, None, skip_reason="the fp32 kernel is a CPU fp32 op")
        return
    kernel = ops.extension_loaded() and hasattr(torch.ops.gitfast, "linear_fp32")
    for rows, k, n in _shapes(quick):
        shape = {"rows": rows, "in": k, "out": n}
        torch.manual_seed(rows + k)
        sets = rotating(lambda: (torch.randn(rows, k), torch.randn(n, k), torch.randn(n)),
                        copies_for(4.0 * n * k, device))

        def case(provider, fn, reason=None):
            return Case(SUITE, shape, provider, dt, fn if reason is None else None, flops=2.0 * rows * k * n,
                        bytes=4.0 * (n * k + rows * (k + n) + n), skip_reason=reason, label=f"{rows}x{k}->{n}")

        yield case("gitfast", lambda: torch.ops.gitfast.linear_fp32(*sets.next()),
                   None if kernel else "gitfast._C is not built with linear_fp32")
        yield case("torch", lambda: F.linear(*sets.next()))
