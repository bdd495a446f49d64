"""Which GEMM serves fp32 Linear layers at few rows on the CPU: one decision measured once per process
(gitfast.backend_choice).

- "linear_fp32_narrow" (an fp32 Linear at up to `NARROW_MAX_ROWS` rows: decode steps of up to that
  many sequences): "torch", F.linear (MKL's sgemm), or "cpu ext", gitfast._C's linear_fp32, which
  reads each weight from memory once per call whatever the row count (MKL reads it at about its
  one-row speed only at one row: bench/RESULTS.md, 2026-12-07). GITFAST_LINEAR_FP32_NARROW_BACKEND
  forces one.

"torch" comes first: the kernel sums in another order than MKL (results agree to fp32 rounding, not
bitwise), so it is kept only where it measures faster by more than backend_choice's margin. Each
candidate is checked against an fp64 product on a small odd case before it is timed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .backend_choice import Decision, Unfit, choose, decided

KIND = "linear_fp32_narrow"
ENV = "GITFAST_LINEAR_FP32_NARROW_BACKEND"
# The most rows the kernel serves: AMD Zen 3, one thread, weights from memory, 1.3-2x F.linear's speed
# at 2-16 rows over git-base's decoder shapes; at 32 rows between 0.8x and 1.2x (bench/RESULTS.md).
NARROW_MAX_ROWS = 16
# (rows, in, out), cheapest first: git-base's decoder at one sequence and at a decode batch of 8.
SHAPES = ((1, 768, 3072), (8, 768, 3072), (8, 3072, 768))


def _kernel(w: torch.Tensor):
    # gitfast.ops (which uses this decision) has loaded gitfast._C, if it is built, by now
    if not hasattr(torch.ops.gitfast, "linear_fp32"):
        raise Unfit("gitfast._C is not built with the fp32 kernel")
    return lambda x: torch.ops.gitfast.linear_fp32(x, w, None)


_MAKERS = {"torch": lambda w: (lambda x: F.linear(x, w)), "cpu ext": _kernel}


def _prepare(name: str):
    """backend_choice candidate: `name`'s product must match fp64's to fp32 rounding (relative to the
    sum of |products|, K = 53) on a small odd case, then one call per shape of SHAPES."""
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
    calls = []
    for rows, k, n in SHAPES:
        run = make(torch.randn(n, k, generator=g))
        calls.append(functools.partial(run, torch.randn(rows, k, generator=g)))
    return calls


def decide() -> str:
    """The measured (or forced) backend for fp32 Linear at few rows: "torch" or "cpu ext". While
    torch.compile traces, nothing is measured: a decision not made yet reads as "torch"."""
    made = decided(KIND)
    if made is not None:
        return made.chosen
    if torch.compiler.is_compiling():
        return "torch"
    return choose(KIND, {name: functools.partial(_prepare, name) for name in _MAKERS}, ENV).chosen


def decision() -> Decision:
    """The decision itself (made now if it was not yet), with its times: for `gitfast info`."""
    decide()
    return decided(KIND)


def kernel_serves_narrow_linear() -> bool:
    """Whether fp32 Linear layers on the CPU take gitfast._C's kernel at up to NARROW_MAX_ROWS rows."""
    return decide() == "cpu ext"


def describe(device) -> str:
    """What serves an fp32 `ops.Linear` (and `ops.Logits`) on `device`, with the measurement: the
    extension's kernel at up to NARROW_MAX_ROWS rows where it measured faster, F.linear otherwise."""
    if torch.device(device).type != "cpu":
        return "torch"
    made = decision()
    how = made.summary()[len(made.chosen):].strip()  # "(measured; cpu ext 2.1 ms, torch 3.4 ms)"
    return f"cpu ext at <= {NARROW_MAX_ROWS} rows; torch above {how}" if made.chosen == "cpu ext" else f"torch {how}"
