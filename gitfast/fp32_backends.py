"""Which GEMM serves fp32 Linear layers at few rows on the CPU: one decision per row band, each
measured once per process (gitfast.backend_choice).

Decode steps run every Linear on as many rows as there are sequences, so each step reads every weight
once and the weight read is much of its cost. MKL's sgemm called the way F.linear calls it reads the
weights at about its memory speed at one row only (bench/RESULTS.md). The candidates, in order of
preference:

- "torch": F.linear (MKL's sgemm, x @ W^T);
- "cpu ext": gitfast._C's linear_fp32, which reads each weight from memory once per call whatever the
  row count;
- "torch swapped": the same product computed as (W @ x^T)^T, MKL's sgemm with the weight as the tall
  operand, then the small result transposed back (AMD Zen 3, 2 threads, 32 rows, weights streamed from
  memory: 0.68-0.73x F.linear's time, in another of MKL's kernels).

The bands: "narrow", 1 to NARROW_MAX_ROWS rows (one sequence, and decode batches up to 16), timed on
weights that stay in cache (cheap: `gitfast caption one.png` makes this decision); "middle", up to
MIDDLE_MAX_ROWS rows (the Captioner's batch of 32), timed at 32 rows on weights larger than a 32 MiB
last-level cache, as a decode step streams its weights (git-base reads 264 MB per step); it serves
weights of at least MIDDLE_MIN_WEIGHT elements (1 MiB: git-base's smallest decoder weight is 2.25 MiB),
and smaller ones, which stay in cache where the band was not measured, keep F.linear (this also spares
a small model, such as the embedded one, whose 26 image tokens per image fall in the band, the band's
0.3 s measurement). Beyond MIDDLE_MAX_ROWS, F.linear (at 128 rows and up MKL's own call was the fastest
measured).
GITFAST_LINEAR_FP32_NARROW_BACKEND / GITFAST_LINEAR_FP32_MIDDLE_BACKEND force one.

"torch" comes first: the others sum in another order than F.linear (results agree to fp32 rounding,
not bitwise), so they are kept only where they measure faster by more than backend_choice's margin.
Each candidate is checked against an fp64 product on a small odd case before it is timed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .backend_choice import Decision, Unfit, choose, decided


@dataclass(frozen=True)
class Band:
    name: str
    most_rows: int
    kind: str                                  # backend_choice's key
    env: str                                   # forces a candidate by name
    shapes: Tuple[Tuple[int, int, int], ...]   # timed (rows, in, out), cheapest first


# The narrow band's limit: AMD Zen 3, one thread, weights from memory, the kernel at 1.3-2x F.linear's
# speed at 2-16 rows over git-base's decoder shapes.
NARROW = Band("narrow", 16, "linear_fp32_narrow", "GITFAST_LINEAR_FP32_NARROW_BACKEND",
              ((1, 768, 3072), (8, 768, 3072), (8, 3072, 768)))
# 94 MB of weights, past the last-level cache of the CPUs measured (32 MiB), in a decode step's mix:
# git-base's decoder and head read 4/5 of their weight bytes with 768 inputs, 1/5 with 3072.
MIDDLE = Band("middle", 64, "linear_fp32_middle", "GITFAST_LINEAR_FP32_MIDDLE_BACKEND",
              ((32, 768, 32 * 768), (32, 3072, 2 * 768)))
BANDS = (NARROW, MIDDLE)
NARROW_MAX_ROWS, MIDDLE_MAX_ROWS = NARROW.most_rows, MIDDLE.most_rows
MIDDLE_MIN_WEIGHT = 2**18


def swapped_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ w^T + b computed as (w @ x^T + b)^T: the "torch swapped" backend. Contiguous like F.linear's."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.mm(w, rows.t()) if b is None else torch.addmm(b.unsqueeze(1), w, rows.t())
    return y.t().contiguous().reshape(*x.shape[:-1], w.shape[0])


def _kernel(w: torch.Tensor):
    # gitfast.ops (which uses these decisions, and which gitfast info imports before asking) has loaded
    # gitfast._C, if it is built, by now; importing ops here would be an import cycle
    if not hasattr(torch.ops.gitfast, "linear_fp32"):
        raise Unfit("gitfast._C is not built with the fp32 kernel")
    return lambda x: torch.ops.gitfast.linear_fp32(x, w, None)


_MAKERS = {"torch": lambda w: (lambda x: F.linear(x, w)),
           "cpu ext": _kernel,
           "torch swapped": lambda w: (lambda x: swapped_linear(x, w, None))}


def _operands(shapes, seed: int = 0):
    """(weight, input) per (rows, in, out) of `shapes`. A large weight repeats one random block of about
    8 MB: making the values costs far more time than copying them, and the timing is the same."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, k, n in shapes:
        block = torch.randn(min(n, max(1, 2**21 // k)), k, generator=g)
        w = block.repeat(-(-n // block.shape[0]), 1)[:n].contiguous()
        out.append((w, torch.randn(rows, k, generator=g)))
    return out


def _prepare(name: str, operands):
    """backend_choice candidate: `name`'s product must match fp64's to fp32 rounding (relative to the
    sum of |products|, K = 53) on a small odd case; then a maker of one call per (weight, input) of
    `operands()` (built only if the candidates are timed: the middle band's are 94 MB)."""
    make = _MAKERS[name]
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(37, 53, generator=g), torch.randn(3, 53, generator=g)
    try:
        got = make(w)(x).double()
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        raise Unfit(f"does not run here ({str(exc).splitlines()[0][:120]})") from exc
    want = x.double() @ w.double().t()
    scale = (x.double().abs() @ w.double().abs().t()).max().item()
    if got.shape != want.shape or (got - want).abs().max().item() > 53 * 2.0**-24 * scale:
        raise Unfit("wrong results on the check case")
    return lambda: [functools.partial(make(w), x) for w, x in operands()]


def decide(band: Band = NARROW) -> str:
    """The measured (or forced) backend for fp32 Linear in `band`: "torch", "torch swapped" or "cpu
    ext". While torch.compile traces, nothing is measured: a decision not made yet reads as "torch"."""
    made = decided(band.kind)
    if made is not None:
        return made.chosen
    if torch.compiler.is_compiling():
        return "torch"
    operands = functools.lru_cache(maxsize=1)(functools.partial(_operands, band.shapes))  # shared, dropped once decided
    return choose(band.kind, {name: functools.partial(_prepare, name, operands) for name in _MAKERS},
                  band.env).chosen


def backend(rows: int, weight_elements: int) -> str:
    """The backend for an fp32 CPU inference Linear over `rows` rows: its band's decision, or "torch"
    past the last band (and in the middle band for a weight under MIDDLE_MIN_WEIGHT elements)."""
    if rows <= NARROW.most_rows:
        return decide(NARROW)
    if rows <= MIDDLE.most_rows and weight_elements >= MIDDLE_MIN_WEIGHT:
        return decide(MIDDLE)
    return "torch"


def decision(band: Band = NARROW) -> Decision:
    """The band's decision (made now if it was not yet), with its times: for `gitfast info`."""
    decide(band)
    return decided(band.kind)


def kernel_serves_narrow_linear() -> bool:
    """Whether fp32 Linear layers on the CPU take gitfast._C's kernel at up to NARROW_MAX_ROWS rows."""
    return decide(NARROW) == "cpu ext"


def describe(device) -> str:
    """What serves an fp32 `ops.Linear` (and `ops.Logits`) on `device`, band by band, with the
    measurements: e.g. "cpu ext at <= 16 rows (measured; ...); cpu ext at 17-64 rows of weights >= 1 MiB
    (...); torch above"."""
    if torch.device(device).type != "cpu":
        return "torch"
    parts, low = [], 1
    for band in BANDS:
        made = decision(band)
        how = made.summary()[len(made.chosen):].strip()  # "(measured; cpu ext 2.1 ms, torch 3.4 ms)"
        rows = f"<= {band.most_rows} rows" if low == 1 else \
            f"{low}-{band.most_rows} rows of weights >= {MIDDLE_MIN_WEIGHT * 4 // 2**20} MiB"
        parts.append(f"{made.chosen} at {rows} {how}")
        low = band.most_rows + 1
    return "; ".join(parts) + "; torch above"
