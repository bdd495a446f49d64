"""Device ceilings measured in the same run as the kernels they judge.

- bandwidth: a large device-to-device copy, counting bytes read + written (TB/s);
- compute: a large square matmul (TFLOP/s) — bf16 on a GPU, fp32 on the CPU — plus one per dtype the
  run benchmarks, so an fp16 kernel is judged against an fp16 matmul, not a bf16 one.

These are *achieved* ceilings (what torch's copy and cuBLAS / oneDNN reach here), not datasheet
peaks; "% of peak" in the results means of these. Each uses the fastest timing sample, not the
median: a ceiling is the best the device showed, and the fastest sample is the one least disturbed
by other load on a shared machine. A kernel's % of peak is its position on the
roofline: ``max(tflops / compute_ceiling, tbps / bandwidth_ceiling)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch

from gitfast.bench import timing

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Ceilings:
    device: str
    bandwidth_tbps: float                       # copy: (read + written bytes) / time
    matmul_tflops: dict[str, float]             # dtype name -> achieved TFLOP/s
    compute_dtype: str                          # the headline matmul dtype
    details: dict = field(default_factory=dict)  # sizes and timings behind each number

    def compute_tflops(self, dtype: Optional[str] = None) -> float:
        if dtype in self.matmul_tflops:
            return self.matmul_tflops[dtype]
        return self.matmul_tflops[self.compute_dtype]

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Ceilings":
        return cls(d["device"], d["bandwidth_tbps"], dict(d["matmul_tflops"]), d["compute_dtype"],
                   dict(d.get("details", {})))


def pct_of_peak(ceilings: Optional[Ceilings], dtype: str, tflops: Optional[float],
                tbps: Optional[float]) -> tuple[Optional[float], Optional[str]]:
    """(percent of the binding ceiling, "compute" | "memory"), or (None, None) without numbers."""
    if ceilings is None:
        return None, None
    fractions = {}
    if tflops is not None:
        fractions["compute"] = tflops / ceilings.compute_tflops(dtype)
    if tbps is not None:
        fractions["memory"] = tbps / ceilings.bandwidth_tbps
    if not fractions:
        return None, None
    bound = max(fractions, key=fractions.get)
    return 100.0 * fractions[bound], bound


def _copy_bytes(device: torch.device, quick: bool) -> int:
    if device.type == "cuda":
        return 1 << 30                                   # 1 GiB each way, far beyond any L2
    return (64 << 20) if quick else (256 << 20)          # beyond a server CPU's L3


def _matmul_n(device: torch.device, dtype: torch.dtype, quick: bool) -> int:
    if device.type == "cuda":
        return 8192
    if dtype == torch.float16:
        return 256                                       # CPU fp16 matmul is emulated: tiny or it takes minutes
    return 1024 if quick else 2048


def measure_bandwidth(device: str, quick: bool = False) -> tuple[float, dict]:
    dev = torch.device(device)
    nbytes = _copy_bytes(dev, quick)
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timing.measure(lambda: dst.copy_(src), dev, flush_l2=False, graph_below_ms=None,
                       **timing.default_budget(dev, quick))
    tbps = 2 * nbytes / (t.min_ms * 1e-3) / 1e12
    del src, dst
    return tbps, {"copy_bytes": nbytes, "moved_bytes": 2 * nbytes, "min_ms": t.min_ms,
                  "median_ms": t.median_ms, "method": t.method}


def measure_matmul(device: str, dtype: str, quick: bool = False) -> tuple[float, dict]:
    dev = torch.device(device)
    tdtype = _DTYPES[dtype]
    n = _matmul_n(dev, tdtype, quick)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=tdtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=tdtype, generator=gen)
    out = torch.empty(n, n, device=dev, dtype=tdtype)
    t = timing.measure(lambda: torch.mm(a, b, out=out), dev, flush_l2=False, graph_below_ms=None,
                       **timing.default_budget(dev, quick))
    tflops = 2 * n ** 3 / (t.min_ms * 1e-3) / 1e12
    del a, b, out
    return tflops, {"n": n, "min_ms": t.min_ms, "median_ms": t.median_ms, "method": t.method}


def measure(device: str, dtypes: Iterable[str] = (), quick: bool = False) -> Ceilings:
    """Measure the copy bandwidth and matmul throughput of ``device`` (headline dtype + ``dtypes``)."""
    dev = torch.device(device)
    headline = "bfloat16" if dev.type == "cuda" else "float32"
    bw, bw_details = measure_bandwidth(device, quick)
    tflops, details = {}, {"copy": bw_details}
    for name in dict.fromkeys([headline, *dtypes]):
        tflops[name], details[f"matmul_{name}"] = measure_matmul(device, name, quick)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(str(dev), bw, tflops, headline, details)
