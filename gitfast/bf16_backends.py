"""Which GEMM serves bf16 weights on the CPU: three decisions measured once per process
(gitfast.backend_choice) instead of rules that held on the CPU they were measured on (Intel with AMX).

- "linear_bf16" (a bf16 Linear above `narrow_rows()` rows): "onednn packed", oneDNN on a copy of the
  weight re-laid out once (plain F.linear has oneDNN re-lay it out on every call: 1.3-1.9x slower per
  GEMM at git-base's shapes on AMX), "torch" (F.linear), or "fp32 upcast": MKL's fp32 GEMM on the bf16
  values widened to fp32 for the call, the result rounded to bf16 once (the same numbers as a bf16
  GEMM that sums in fp32, which oneDNN's does: products of bf16 values are exact in fp32). On a CPU
  without bf16 arithmetic, torch's bf16 GEMM runs a slow path: AMD Zen 3, 2 threads, 1576x768x3072
  375 ms in bf16, 48 ms upcast. The widened weight lives for the call only, so a bf16 model keeps
  its memory. GITFAST_LINEAR_BF16_BACKEND forces one.
- "linear_bf16_narrow" (up to `narrow_rows()` rows: decode steps): "cpu ext", gitfast._C's bf16 x
  bf16 kernel on its own packed copy (it reads weights faster than oneDNN at one to four rows on
  AVX512-BF16: 4.4-5.2 vs 6.3-8.3 ms for one decode step's GEMMs; on Zen 3 it beats the upcast GEMM
  up to about 64 rows: 1.8 vs 3.2 ms at 32x768x3072), or the "linear_bf16" backend. Consulted only
  where "onednn packed" or "fp32 upcast" serves the wider GEMMs. GITFAST_LINEAR_BF16_NARROW_BACKEND.
- "logits_bf16" (the LM head's fp32 logits from bf16 weights, up to `ops.Logits.KERNEL_ROWS` rows):
  "cpu ext", the same kernel with fp32 output (half the bytes of an fp32 GEMM's weight), or
  "torch fp32", MKL's fp32 GEMM on an upcast copy. GITFAST_LOGITS_BACKEND.

Each candidate is checked against an fp64 product on a small odd case before it is timed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .backend_choice import Unfit, choose, decided

# (rows, in, out), cheapest first: git-base's decoder MLP at a decode batch and at an image prefix;
# its LM head against a slice of the vocabulary (the whole head would cost 140 MB to measure).
WIDE_SHAPES = ((8, 768, 3072), (256, 768, 3072))
LOGITS_SHAPES = ((1, 768, 8192), (32, 768, 8192))


def _onednn_packed(w: torch.Tensor):
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")):
        raise Unfit("this torch has no oneDNN linear ops")
    packed = mkldnn._reorder_linear_weight(w, 8)
    return lambda x: mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _kernel(w: torch.Tensor, fp32_out: bool):
    # gitfast.ops (which uses these decisions) has loaded gitfast._C, if it is built, by now
    if not hasattr(torch.ops.gitfast, "linear_bf16"):
        raise Unfit("gitfast._C is not built with the bf16 kernel")
    packed = torch.ops.gitfast.pack_bf16_cols(w)
    return lambda x: torch.ops.gitfast.linear_bf16(x, packed, w.shape[0], None, fp32_out)


def _fp32(w: torch.Tensor):
    wf = w.float()
    return lambda x: F.linear(x.float(), wf)


def upcast_linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """x W^T + b for bf16 x and W through an fp32 GEMM, in fp32 (the caller rounds once, after any
    activation)."""
    return F.linear(x.float(), w.float(), None if bias is None else bias.float())


_MAKERS = {
    "linear_bf16": {"onednn packed": _onednn_packed, "torch": lambda w: (lambda x: F.linear(x, w)),
                    "fp32 upcast": lambda w: (lambda x: upcast_linear(x, w).bfloat16())},
    "logits_bf16": {"cpu ext": lambda w: _kernel(w, True), "torch fp32": _fp32},
}
_SHAPES = {"linear_bf16": WIDE_SHAPES, "logits_bf16": LOGITS_SHAPES}
# The most rows the narrow kernel serves, by wide backend: on AMX oneDNN's packed GEMM is faster from
# eight rows; on Zen 3 the kernel beats the upcast GEMM up to about 64 rows (the table above), and 32
# covers the Captioner's default decode batch.
_NARROW_ROWS = {"onednn packed": 4, "fp32 upcast": 32}
_ENV = {"linear_bf16": "GITFAST_LINEAR_BF16_BACKEND", "linear_bf16_narrow": "GITFAST_LINEAR_BF16_NARROW_BACKEND",
        "logits_bf16": "GITFAST_LOGITS_BACKEND"}


def _narrow_makers() -> dict:
    """"linear_bf16_narrow"'s candidates: the kernel, or what serves the wider calls."""
    wide = decide("linear_bf16")
    return {"cpu ext": lambda w: _kernel(w, False), wide: _MAKERS["linear_bf16"][wide]}


def _makers(kind: str) -> dict:
    return _narrow_makers() if kind == "linear_bf16_narrow" else _MAKERS[kind]


def _shapes(kind: str) -> tuple:
    if kind == "linear_bf16_narrow":  # one row, a decode batch of 8 (where it serves that many), the most it serves
        return tuple((rows, 768, 3072) for rows in sorted({1, min(8, narrow_rows()), narrow_rows()}))
    return _SHAPES[kind]


def _prepare(kind: str, name: str):
    """backend_choice candidate: `name`'s product must match fp64's on a small odd case (bf16 output
    to bf16's rounding, fp32 output to fp32's), then one call per shape of `kind`."""
    make = _makers(kind)[name]
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(37, 52, generator=g).bfloat16(), torch.randn(3, 52, generator=g).bfloat16()
    try:
        got = make(w)(x).double()
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        raise Unfit(f"does not run here ({str(exc).splitlines()[0][:120]})") from exc
    want = x.double() @ w.double().t()
    tol = 1e-2 if kind != "logits_bf16" else 1e-5
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
        raise Unfit("wrong results on the check case")
    calls = []
    for rows, k, n in _shapes(kind):
        run = make(torch.randn(n, k, generator=g).bfloat16())
        calls.append(functools.partial(run, torch.randn(rows, k, generator=g).bfloat16()))
    return calls


def decide(kind: str) -> str:
    """The measured (or forced) backend for `kind`: one of `_makers(kind)`. While torch.compile
    traces, nothing is measured: a decision not made yet reads as the first candidate's rival
    ("torch" / the wide backend / "torch fp32")."""
    made = decided(kind)
    if made is not None:
        return made.chosen
    if torch.compiler.is_compiling():
        return "torch" if kind != "logits_bf16" else "torch fp32"
    candidates = {name: functools.partial(_prepare, kind, name) for name in _makers(kind)}
    return choose(kind, candidates, _ENV[kind]).chosen


def wide_linear() -> str:
    """What serves bf16 Linear layers on the CPU above `narrow_rows()` rows: "onednn packed", "torch"
    or "fp32 upcast"."""
    return decide("linear_bf16")


def packs_linear() -> bool:
    """Whether bf16 Linear layers on the CPU read a oneDNN pre-packed weight."""
    return wide_linear() == "onednn packed"


def narrow_rows() -> int:
    """Up to how many rows a bf16 Linear may take gitfast._C's kernel (0: never)."""
    return _NARROW_ROWS.get(wide_linear(), 0)


def kernel_serves_narrow_linear() -> bool:
    """Whether up to `narrow_rows()` rows of a bf16 Linear go through gitfast._C's kernel."""
    return narrow_rows() > 0 and decide("linear_bf16_narrow") == "cpu ext"


def kernel_serves_logits() -> bool:
    """Whether bf16 (and INT8's bf16-read) LM heads compute decode-sized logits in gitfast._C's kernel."""
    return decide("logits_bf16") == "cpu ext"
