"""Dynamic INT8 on the CPU: INT8 weights (one scale per output channel) and activations quantized
per token at run time, for the Linear layers of the vision encoder, the projection and the decoder.

`quantize(model, "dynamic")` swaps each `ops.Linear` of a `GitModel` for a `DynamicInt8Linear` in
place (the float weights are let go: a quarter of fp32's weight memory). One layer call is

    q, s = quantize_rows(x)                       # int8 rows, s[m] = max|x[m]| / 127
    acc  = q @ W_int8^T  (int32, times w_scale)   # the backend's int8 GEMM
    y    = act(acc * s[m] + bias)                 # dequantize_rows, in the activations' dtype

with both row passes in gitfast._C (one pass over the data each; plain torch without the
extension). The GEMM's backend is the fastest of these that gives the reference integers here,
measured once per process on decoder- and vision-sized shapes (gitfast.backend_choice; `backend()`
says which, `gitfast info` shows the times, GITFAST_INT8_BACKEND=<name> forces one):
- "onednn": `torch.ops.onednn.qlinear_pointwise` on a weight pre-packed once by
  `qlinear_prepack` (VNNI / AMX-INT8 where the CPU has them); the activation scale is passed as 1 and
  applied per row afterwards, which oneDNN's per-tensor activation scale cannot express. Where oneDNN
  has no INT8 kernel for the CPU it runs a reference path: right integers, 90.7 s for one
  1576x768x3072 GEMM on an AMD Zen 5, which is why availability alone never decides;
- "cpu ext": gitfast._C's exact int8 GEMM (csrc/cpu/int8_gemm.cpp: int16 pair products, VPMADDWD, on
  AVX2 or AVX-512), for CPUs where neither library has a fast exact one: on an AMD Zen 3 (AVX2, no
  VNNI) one thread, 1.2x an fp32 GEMM of the same integers at 256 rows, 2x at 1-32 rows, where
  torch._int_mm took 20x the fp32 GEMM's time and oneDNN gave wrong integers;
- "torch._int_mm": PyTorch's int8 x int8 -> int32 GEMM, weight scales applied in the row pass;
- "reference": the same integers through an fp32 matmul (exact for |acc| < 2^24).

What stays in the model's own precision, and why (greedy captions vs fp32, bench/RESULTS.md):
- the patch embedding (a convolution; <1% of the FLOPs) and every LayerNorm / embedding;
- attention itself (scores and softmax; its projections are INT8);
- the LM head (`KEEP`): its logits pick each token, and quantizing it costs caption agreement
  (bench/RESULTS.md). Where the extension's bf16 x bf16 -> fp32 kernel measured faster than an fp32 GEMM
  (gitfast.bf16_backends: CPUs with AVX512-BF16) it reads its weight rounded to bf16 once, through that kernel
  (`ops.Logits.reads_bf16`): half the bytes of the fp32 weight
  it reads every decode step, 26% of INT8's time at batch 8 before (profile). Measured: INT8 generate
  1.34x faster at batch 8, 1.16x at batch 1; greedy captions identical to fp32's 11/32 with the bf16
  head, 9/32 with the fp32 one, transformers + dynamic INT8 6/32 (32 images, git-base shapes).
CUDA is refused: use dtype=float16 / bfloat16 there.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch import nn

from . import bf16_backends, ops

log = logging.getLogger(__name__)

METHODS = ("dynamic",)
KEEP = ("lm_head",)  # module names left in the model's precision (see the module docstring)
BACKENDS = ("onednn", "cpu ext", "torch._int_mm", "reference")  # in order of preference


def method_of(quantization_config) -> Optional[str]:
    """None, "dynamic", or a dict / object with a `method` (or `quant_method`) "dynamic" -> the
    method name or None; anything else is refused by name."""
    if quantization_config is None:
        return None
    name = quantization_config
    if not isinstance(name, str):
        get = name.get if isinstance(name, dict) else lambda k, d=None: getattr(name, k, d)
        name = get("method", None) or get("quant_method", None)
    if name not in METHODS:
        raise ValueError(f"unsupported quantization_config {quantization_config!r}; gitfast supports "
                         f"{', '.join(repr(m) for m in METHODS)} (INT8 weights, per-token INT8 activations, CPU)")
    return name


# -- the row passes -------------------------------------------------------------------------------

def quantize_rows_reference(x: torch.Tensor):
    """Per-row symmetric int8: (q, scale) with q = round(x * 127 / max|x|), scale = max|x| / 127."""
    xf = x.float()
    m = xf.abs().amax(-1)
    inv = torch.where(m > 0, 127.0 / m, torch.zeros_like(m))
    return torch.round(xf * inv[..., None]).to(torch.int8), m / 127.0


def dequantize_rows_reference(acc, row_scale, col_scale, bias, activation, dtype):
    y = acc.float() * row_scale[:, None]
    if col_scale is not None:
        y = y * col_scale
    if bias is not None:
        y = y + bias.float()
    return (y if activation is None else ops.activation_reference(y, activation)).to(dtype)


def _use_extension(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and ops.backend("bias_act", "cpu") == "cpu ext" and hasattr(
        torch.ops.gitfast, "quantize_rows")


def quantize_rows(x: torch.Tensor):
    if _use_extension(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.ops.gitfast.quantize_rows(x.contiguous())
    return quantize_rows_reference(x)


def dequantize_rows(acc, row_scale, col_scale, bias, activation, dtype):
    if _use_extension(acc):
        return torch.ops.gitfast.dequantize_rows(acc.contiguous(), row_scale.contiguous(), col_scale, bias,
                                                 activation, dtype)
    return dequantize_rows_reference(acc, row_scale, col_scale, bias, activation, dtype)


# -- the int8 GEMM backends -----------------------------------------------------------------------

def _onednn_pack(w_int8):
    return torch.ops.onednn.qlinear_prepack(w_int8, None)


def _onednn_mm(q, packed, w_scale, w_zero):
    # activation scale 1, zero point 0: acc * w_scale in fp32; the per-row scale comes after
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def _gemm(name: str, q, w_int8, w_scale, packed, zero):
    """(acc, column scale still to apply) for int8 rows `q` through backend `name`: acc holds the exact
    products q @ w_int8^T (int32, or fp32 values), times `w_scale` already where the backend applies
    it (oneDNN, on its `packed` weight; the scale left is then None)."""
    if name == "onednn":
        return _onednn_mm(q, packed, w_scale, zero), None
    if name == "cpu ext":
        return torch.ops.gitfast.int8_mm(q, w_int8), w_scale
    if name == "torch._int_mm":
        return torch._int_mm(q, w_int8.t()), w_scale
    return q.float() @ w_int8.float().t(), w_scale


def _int8_mm(name: str, w_int8: torch.Tensor):
    """`q -> q @ w_int8^T` (int32-exact values, float or int32) through backend `name`."""
    if name == "cpu ext" and not (ops.extension_loaded() and hasattr(torch.ops.gitfast, "int8_mm")):
        raise RuntimeError("gitfast._C is not built with int8_mm")
    n = w_int8.shape[0]
    packed = _onednn_pack(w_int8) if name == "onednn" else None
    ones, zero = torch.ones(n), torch.zeros(n, dtype=torch.int64)
    return lambda q: _gemm(name, q, w_int8, ones, packed, zero)[0]


# (rows, in, out), cheapest first: a decode step's MLP GEMM at one sequence and its attention GEMM at
# a batch of 32, then a vision encoder's MLP GEMM at one image (a pathological backend, 41M MAC/s,
# costs 0.06 s on the first before it drops out)
MEASURED_SHAPES = ((1, 768, 3072), (32, 768, 768), (256, 768, 3072))


def _prepare(name: str):
    """backend_choice candidate: `name` must give the reference integers on a small odd case; then one
    GEMM call per MEASURED_SHAPES."""
    from .backend_choice import Unfit

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (17, 40), generator=g, dtype=torch.int8)
    try:
        got = _int8_mm(name, w)(q)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        raise Unfit(f"does not run here ({str(exc).splitlines()[0][:120]})") from exc
    if not torch.equal(got.float(), q.float() @ w.float().t()):
        raise Unfit("wrong integers on the check case")
    calls = []
    for rows, k, n in MEASURED_SHAPES:
        mm = _int8_mm(name, torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
        x = torch.randint(-127, 128, (rows, k), generator=g, dtype=torch.int8)
        calls.append(functools.partial(mm, x))
    return calls


def backend() -> str:
    """The int8 GEMM serving DynamicInt8Linear on this machine: measured once per process."""
    return decision().chosen


def decision():
    """backend_choice.Decision for the int8 GEMM (its times and the candidates ruled out)."""
    from .backend_choice import choose

    return choose("int8_gemm", {name: functools.partial(_prepare, name) for name in BACKENDS},
                  "GITFAST_INT8_BACKEND")


class DynamicInt8Linear(nn.Module):
    """`act(x W^T + b)` with W in int8 (a scale per output channel) and x quantized per row (token)
    at each call; outputs in x's dtype. Inference only (no autograd)."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.backend = backend()
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._packed = _onednn_pack(self.weight_int8) if self.backend == "onednn" else None
        self._zero = torch.zeros(self.out_features, dtype=torch.int64)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DynamicInt8Linear":
        w = linear.weight.detach().float()
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        w_int8 = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(w_int8, scale, linear.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"

    def forward(self, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"DynamicInt8Linear runs on the CPU only; got input on {x.device}")
        shape = x.shape
        q, s = quantize_rows(x.reshape(-1, self.in_features))
        acc, col = _gemm(self.backend, q, self.weight_int8, self.weight_scale, self._packed, self._zero)
        y = dequantize_rows(acc, s, col, self.bias, activation, x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
        """The same layer in plain torch (tests' ground truth)."""
        q, s = quantize_rows_reference(x.reshape(-1, self.in_features))
        y = dequantize_rows_reference(q.double() @ self.weight_int8.double().t(), s, self.weight_scale,
                                      self.bias, activation, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module, quantization_config="dynamic", keep=KEEP) -> nn.Module:
    """Swaps every `ops.Linear` of `model` (a GitModel, on the CPU) whose name is not in `keep` for a
    DynamicInt8Linear, in place; returns `model`. None leaves it as it is."""
    if method_of(quantization_config) is None:
        return model
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise ValueError(f"quantization_config={quantization_config!r} (dynamic INT8) runs on the CPU only, but the "
                         f"model is on {p.device}; on a GPU use dtype=torch.float16 or torch.bfloat16 instead")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, ops.Linear) and name not in keep]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, DynamicInt8Linear.from_linear(linear))
    for name, m in model.named_modules():
        if isinstance(m, ops.Logits) and name in keep:
            m.reads_bf16 = bf16_backends.kernel_serves_logits()
    return model


def describe(model: nn.Module) -> Optional[str]:
    """"dynamic INT8 (<backend>)" when `model` holds DynamicInt8Linear layers, else None."""
    layers = [m for m in model.modules() if isinstance(m, DynamicInt8Linear)]
    return f"dynamic INT8 ({layers[0].backend}, {len(layers)} layers)" if layers else None
