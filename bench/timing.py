"""Timing one benchmark call: warm-up, many samples, median and quantiles, synchronisation handled.

- CPU: ``time.perf_counter`` around batches of calls; each sample lasts at least ``min_sample_ms``
  (so timer and loop overhead stay negligible) and sampling runs for ``rep_ms`` after ``warmup_ms``.
- CUDA: one pair of CUDA events per call, the L2 cache flushed before each call (``flush_l2``),
  the same warm-up / repetition budget as ``triton.testing.do_bench``. Calls shorter than
  ``graph_below_ms`` (10 µs by default) are captured ``k`` times into one CUDA graph and the graph is
  replayed per sample, so launch overhead does not swamp the kernel; if capture fails the plain
  event timing is used and ``Timing.note`` says why.

Inputs that fit in cache are the suite's business: ``rotating(factory, n)`` cycles through ``n``
independent input sets so consecutive calls (also the ``k`` calls inside a graph) touch cold memory.
"""
from __future__ import annotations

import ctypes
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    samples: int            # timing samples taken
    calls_per_sample: int   # calls averaged inside one sample (a CPU batch or a CUDA graph)
    method: str             # "perf_counter" | "cuda_events" | "cuda_graph"
    note: str = ""          # e.g. why CUDA graph capture fell back to plain events

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (0 <= q <= 1)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(per_call_ms: Sequence[float], calls_per_sample: int, method: str, note: str = "") -> Timing:
    return Timing(
        median_ms=quantile(per_call_ms, 0.5),
        p20_ms=quantile(per_call_ms, 0.2),
        p80_ms=quantile(per_call_ms, 0.8),
        min_ms=min(per_call_ms),
        mean_ms=sum(per_call_ms) / len(per_call_ms),
        samples=len(per_call_ms),
        calls_per_sample=calls_per_sample,
        method=method,
        note=note,
    )


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def measure(
    fn: Callable[[], Any],
    device: str | torch.device = "cpu",
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_samples: int = 5,
    max_samples: int = 2000,
    flush_l2: bool = True,
    graph_below_ms: Optional[float] = 0.01,
    min_sample_ms: float = 1.0,
) -> Timing:
    """Time ``fn()`` on ``device``; times are per call, in milliseconds.

    ``graph_below_ms=None`` disables CUDA graphs. ``min_sample_ms`` only applies on the CPU.
    """
    if is_cuda(device):
        return _measure_cuda(fn, torch.device(device), warmup_ms, rep_ms, min_samples, max_samples,
                             flush_l2, graph_below_ms)
    return _measure_cpu(fn, warmup_ms, rep_ms, min_samples, max_samples, min_sample_ms)


# -- CPU ------------------------------------------------------------------------------------------

def _measure_cpu(fn, warmup_ms, rep_ms, min_samples, max_samples, min_sample_ms) -> Timing:
    clock = time.perf_counter
    fn()  # first call: lazy initialisation, allocator growth, compilation
    # estimate the cost of one call from at least 2 ms of calls
    n, t0 = 0, clock()
    while True:
        fn()
        n += 1
        elapsed = clock() - t0
        if elapsed >= 2e-3:
            break
    per_call_s = max(elapsed / n, 1e-9)
    # warm-up for the rest of the warm-up budget
    t_end = t0 + warmup_ms * 1e-3
    while clock() < t_end:
        fn()
    batch = max(1, math.ceil(min_sample_ms * 1e-3 / per_call_s))
    samples: list[float] = []
    t_stop = clock() + rep_ms * 1e-3
    while len(samples) < max_samples and (len(samples) < min_samples or clock() < t_stop):
        s = clock()
        for _ in range(batch):
            fn()
        samples.append((clock() - s) * 1e3 / batch)
    return summarize(samples, batch, "perf_counter")


# -- CUDA -----------------------------------------------------------------------------------------

_FLUSH: dict[int, torch.Tensor] = {}


def cache_bytes(device: str | torch.device = "cpu") -> int:
    """Size of the last-level cache that a cold benchmark must defeat (GPU L2, CPU L3)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    for level in ("index3", "index2"):
        path = f"/sys/devices/system/cpu/cpu0/cache/{level}/size"
        try:
            with open(path) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    return 32 << 20


def _flush_buffer(dev: torch.device) -> torch.Tensor:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _FLUSH:
        size = max(256 << 20, 4 * cache_bytes(dev))
        _FLUSH[idx] = torch.empty(size, dtype=torch.int8, device=dev)
    return _FLUSH[idx]


def _events(n: int):
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def _measure_cuda(fn, dev, warmup_ms, rep_ms, min_samples, max_samples, flush_l2, graph_below_ms) -> Timing:
    with torch.cuda.device(dev):
        torch.cuda.synchronize()
        fn()
        torch.cuda.synchronize()
        start, end = _events(2)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 5, 1e-4)

        note = ""
        if graph_below_ms is not None and estimate_ms < graph_below_ms:
            try:
                return _measure_graph(fn, estimate_ms, rep_ms, min_samples)
            except Exception as exc:  # capture is not possible for every fn (host syncs, allocations)
                torch.cuda.synchronize()
                note = f"cuda graph capture failed, plain events used: {type(exc).__name__}: {exc}"[:300]

        for _ in range(max(1, int(warmup_ms / estimate_ms))):
            fn()
        n = min(max_samples, max(min_samples, int(rep_ms / estimate_ms)))
        starts, ends = _events(n), _events(n)
        flush = _flush_buffer(dev) if flush_l2 else None
        for i in range(n):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return summarize(times, 1, "cuda_events", note)


def _measure_graph(fn, estimate_ms, rep_ms, min_samples) -> Timing:
    calls = min(1000, max(10, int(0.5 / estimate_ms)))   # about 0.5 ms of work per replay
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                        # warm up on the capture stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    n = min(500, max(min_samples, int(rep_ms / (estimate_ms * calls))))
    starts, ends = _events(n), _events(n)
    for i in range(n):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / calls for s, e in zip(starts, ends)]
    del graph
    return summarize(times, calls, "cuda_graph")


# -- inputs ---------------------------------------------------------------------------------------

class Rotation:
    """Cycles through prepared input sets: ``next()`` returns the next one, wrapping around."""

    def __init__(self, sets: Sequence[Any]):
        if not sets:
            raise ValueError("rotating() needs at least one input set")
        self.sets = list(sets)
        self._i = 0

    def next(self) -> Any:
        item = self.sets[self._i]
        self._i = (self._i + 1) % len(self.sets)
        return item

    def __len__(self) -> int:
        return len(self.sets)


def rotating(inputs_factory: Callable[[], Any], n: int) -> Rotation:
    """Build ``n`` independent input sets with ``inputs_factory()`` and cycle through them.

    Typical use in a suite::

        inputs = rotating(lambda: (torch.randn(...), torch.randn(...)), copies_for(set_bytes, device))
        fn = lambda: kernel(*inputs.next())
    """
    return Rotation([inputs_factory() for _ in range(max(1, int(n)))])


def copies_for(bytes_per_set: float, device: str | torch.device = "cpu", limit: int = 64) -> int:
    """How many input sets make a rotation at least twice the last-level cache (1 if one set does)."""
    if bytes_per_set <= 0:
        return 1
    return int(min(limit, max(1, math.ceil(2 * cache_bytes(device) / bytes_per_set))))


def peak_memory_bytes(fn: Callable[[], Any], device: str | torch.device) -> int:
    """Peak CUDA memory `fn` allocates on top of what is allocated before it (its outputs dropped)."""
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - before


def steady_cpu_allocator() -> str:
    """Keeps glibc malloc from returning freed heap memory to the OS after every call.

    A CPU op on model-sized rows allocates and frees MB-sized outputs each call; with glibc's
    default thresholds the heap top is trimmed (or the block mmapped) and the next call page-faults
    it all back in, which costs several times the op itself and hits whichever provider's frees
    happen to cross the threshold (measured: 1.5 ms instead of 0.2 ms for add + LayerNorm at
    434 x 768). A long-running process reaches a steady heap anyway; this makes every provider
    start there. Returns what was set, for the results' environment.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return "default (not glibc)"
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "default (mallopt refused)"


def synchronized(fn: Callable[[], Any], device: str | torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation (for timers that only see the host clock)."""
    if not is_cuda(device):
        return fn
    dev = torch.device(device)

    def call():
        out = fn()
        torch.cuda.synchronize(dev)
        return out

    return call


def default_budget(device: str | torch.device, quick: bool) -> dict:
    """Warm-up / repetition budget (ms) per case; ``GITFAST_BENCH_REP_MS`` overrides the repetition."""
    if is_cuda(device):
        budget = {"warmup_ms": 25.0, "rep_ms": 100.0}
    else:
        budget = {"warmup_ms": 10.0, "rep_ms": 50.0} if quick else {"warmup_ms": 50.0, "rep_ms": 300.0}
    if os.environ.get("GITFAST_BENCH_REP_MS"):
        budget["rep_ms"] = float(os.environ["GITFAST_BENCH_REP_MS"])
    return budget
