"""Which GEMM serves bf16 weights on the CPU: three decisions measured once per process
(gitfast.backend_choice) instead of rules that held on the CPU they were measured on (Intel with AMX).

- "linear_bf16" (a bf16 Linear from five rows up): "onednn packed", oneDNN on a copy of the weight
  re-laid out once (plain F.linear has oneDNN re-lay it out on every call: 1.3-1.9x slower per GEMM
  at git-base's shapes on AMX), or "torch" (F.linear). GITFAST_LINEAR_BF16_BACKEND forces one.
- "linear_bf16_narrow" (one to four rows: decode steps of up to four sequences): "cpu ext",
  gitfast._C's bf16 x bf16 kernel on its own packed copy (it reads weights faster than oneDNN at
  these rows on AVX512-BF16: 4.4-5.2 vs 6.3-8.3 ms for one decode step's GEMMs), or "onednn packed".
  Consulted only where "onednn packed" serves the wider GEMMs. GITFAST_LINEAR_BF16_NARROW_BACKEND.
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
NARROW_SHAPES = ((1, 768, 3072), (4, 768, 3072))
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


_MAKERS = {
    "linear_bf16": {"onednn packed": _onednn_packed, "torch": lambda w: (lambda x: F.linear(x, w))},
    "linear_bf16_narrow": {"cpu ext": lambda w: _kernel(w, False), "onednn packed": _onednn_packed},
    "logits_bf16": {"cpu ext": lambda w: _kernel(w, True), "torch fp32": _fp32},
}
_SHAPES = {"linear_bf16": WIDE_SHAPES, "linear_bf16_narrow": NARROW_SHAPES, "logits_bf16": LOGITS_SHAPES}
_ENV = {"linear_bf16": "GITFAST_LINEAR_BF16_BACKEND", "linear_bf16_narrow": "GITFAST_LINEAR_BF16_NARROW_BACKEND",
        "logits_bf16": "GITFAST_LOGITS_BACKEND"}


def _prepare(kind: str, name: str):
    """backend_choice candidate: `name`'s product must match fp64's on a small odd case (bf16 output
    to bf16's rounding, fp32 output to fp32's), then one call per shape of `kind`."""
    make = _MAKERS[kind][name]
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
    for rows, k, n in _SHAPES[kind]:
        run = make(torch.randn(n, k, generator=g).bfloat16())
        calls.append(functools.partial(run, torch.randn(rows, k, generator=g).bfloat16()))
    return calls


def decide(kind: str) -> str:
    """The measured (or forced) backend for `kind`: one of `_MAKERS[kind]`. While torch.compile
    traces, nothing is measured: a decision not made yet reads as the first candidate's rival
    ("torch" / "onednn packed" / "torch fp32")."""
    made = decided(kind)
    if made is not None:
        return made.chosen
    if torch.compiler.is_compiling():
        return list(_MAKERS[kind])[-1]
    candidates = {name: functools.partial(_prepare, kind, name) for name in _MAKERS[kind]}
    return choose(kind, candidates, _ENV[kind]).chosen


def packs_linear() -> bool:
    """Whether bf16 Linear layers on the CPU read a oneDNN pre-packed weight."""
    return decide("linear_bf16") == "onednn packed"


def kernel_serves_narrow_linear() -> bool:
    """Whether one to four rows of a packed bf16 Linear go through gitfast._C's kernel."""
    return packs_linear() and decide("linear_bf16_narrow") == "cpu ext"


def kernel_serves_logits() -> bool:
    """Whether bf16 (and INT8's bf16-read) LM heads compute decode-sized logits in gitfast._C's kernel."""
    return decide("logits_bf16") == "cpu ext"
