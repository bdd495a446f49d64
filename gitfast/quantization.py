"""Dynamic INT8 on the CPU: INT8 weights (one scale per output channel) and activations quantized
per token at run time, for the Linear layers of the vision encoder, the projection and the decoder.

`quantize(model, "dynamic")` swaps each `ops.Linear` of a `GitModel` for a `DynamicInt8Linear` in
place (the float weights are let go: a quarter of fp32's weight memory). One layer call is

    q, s = quantize_rows(x)                       # int8 rows, s[m] = max|x[m]| / 127
    acc  = q @ W_int8^T  (int32, times w_scale)   # the backend's int8 GEMM
    y    = act(acc * s[m] + bias)                 # dequantize_rows, in the activations' dtype

(a 7-bit backend quantizes with `quantize_rows_u7` instead: q in 0..127, x ~ s[m] * (q - z[m]), and
its GEMM gives (q - z) @ W_int8^T), with the row passes in gitfast._C (one pass over the data each; plain torch without the
extension). Inside an MLP whose second layer takes 7-bit rows, the first layer's dequantize pass and
the second's quantize pass are one (`requantize_rows_u7`, bitwise the same q;
`DynamicInt8Linear.feed_forward`). The GEMM's backend is the fastest of these that gives the reference integers here,
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
- "cpu ext vnni": gitfast._C's exact int8 GEMM for CPUs with VNNI (csrc/cpu/int8_gemm_vnni.cpp: VPDPBUSD,
  64 products per AVX512-VNNI instruction and no int16 step, on q + 128 with 128 x the weight's row sums
  taken back, over the 7-bit kernel's packed weight; AMD Zen 4/5, Intel Ice Lake and later). The same
  integers as "cpu ext", so the same captions; without VNNI it runs the same tile with the products done
  in AVX2 (about "cpu ext"'s speed on Zen 3: faster at decode rows, slower at image rows), and the
  measurement decides;
- "cpu ext u7": gitfast._C's GEMM for 7-bit activations (csrc/cpu/int8_gemm_u7.cpp): each row
  quantized to 0..127 with its own scale and zero point (`quantize_rows_u7`), products with
  VPMADDUBSW, 32 per instruction, exact because a pair of them fits int16: 3 instructions per 32
  products where the exact 8-bit kernel needs 4 without VNNI (AMD Zen 3: the 1576x768x3072 GEMM
  48 ms against 64 for "cpu ext" and 52 for fbgemm's dynamic Linear, thread CPU time). Its captions
  differ from the 8-bit ones', so it serves image tokens' rows only, and only where it measures more
  than backend_choice.PREFERENCE_MARGIN faster than the 8-bit backend chosen for text rows
  (int8_backends says why); `activation_bits(config)` says which, `gitfast caption --resume` records it;
- "torch._int_mm": PyTorch's int8 x int8 -> int32 GEMM, weight scales applied in the row pass;
- "reference": the same integers through an fp32 matmul (exact for |acc| < 2^24).

What stays in the model's own precision, and why (greedy captions vs fp32, bench/RESULTS.md):
- the patch embedding (a convolution; <1% of the FLOPs) and every LayerNorm / embedding;
- attention itself (scores and softmax; its projections are INT8);
- the LM head (`KEEP`): its logits pick each token, and quantizing it costs caption agreement
  (bench/RESULTS.md). Where the extension's bf16 x bf16 -> fp32 kernel measured faster than an fp32 GEMM
  (gitfast.bf16_backends: CPUs with AVX512-BF16, and AMD Zen 3's AVX2 path) it reads its weight rounded to bf16
  once, through that kernel
  (`ops.Logits.reads_bf16`): half the bytes of the fp32 weight
  it reads every decode step, 26% of INT8's time at batch 8 before (profile). Measured: INT8 generate
  1.34x faster at batch 8, 1.16x at batch 1; greedy captions identical to fp32's 11/32 with the bf16
  head, 9/32 with the fp32 one, transformers + dynamic INT8 6/32 (32 images, git-base shapes).
CUDA is refused: use dtype=float16 / bfloat16 there.
"""
from __future__ import annotations

import contextvars
from typing import Optional, Tuple

import torch
from torch import nn

from . import bf16_backends, int8_backends, ops

METHODS = ("dynamic",)
KEEP = ("lm_head",)  # module names left in the model's precision (see the module docstring)
IMAGE_ONLY = ("vision.", "proj")  # GitModel's layers that see image tokens only (the vision encoder, projection)


def _field(quantization_config, *names):
    if isinstance(quantization_config, str):
        return quantization_config if "method" in names else None
    get = quantization_config.get if isinstance(quantization_config, dict) else (
        lambda k, d=None: getattr(quantization_config, k, d))
    return next((get(n, None) for n in names if get(n, None) is not None), None)


def method_of(quantization_config) -> Optional[str]:
    """None, "dynamic", or a dict / object with a `method` (or `quant_method`) "dynamic" -> the
    method name or None; anything else is refused by name."""
    if quantization_config is None:
        return None
    name = _field(quantization_config, "method", "quant_method")
    if name not in METHODS:
        raise ValueError(f"unsupported quantization_config {quantization_config!r}; gitfast supports "
                         f"{', '.join(repr(m) for m in METHODS)} (INT8 weights, per-token INT8 activations, CPU)")
    return name


def _named_backend(quantization_config, key: str) -> Optional[str]:
    from .backend_choice import Unfit

    name = None if quantization_config is None else _field(quantization_config, key)
    if name is None:
        return None
    if name not in int8_backends.BACKENDS:
        raise ValueError(f"quantization_config {key} {name!r} is not one of {', '.join(int8_backends.BACKENDS)}")
    try:
        int8_backends.prepare(name, shapes=())  # the check, without the timed shapes' weights
    except Unfit as exc:
        raise ValueError(f"quantization_config {key} {name!r} cannot serve here: {exc}") from exc
    return name


def backends_of(quantization_config) -> Tuple[str, str]:
    """(text, image) int8 GEMM backends, for text tokens' and image tokens' rows: those a dict / object
    config names under "backend" (all rows) and "image_backend", else the ones measured here; a name
    that is unknown, or whose backend cannot serve here, is refused."""
    text = _named_backend(quantization_config, "backend")
    image = _named_backend(quantization_config, "image_backend") or text
    return text or int8_backends.backend(), image or int8_backends.image_backend()


def resolved(quantization_config):
    """`quantization_config` with the backends it will run on written in ({"method", "backend",
    "image_backend"}; None stays None): what a run hands its other processes so that all of them
    quantize alike."""
    method = method_of(quantization_config)
    if method is None:
        return None
    text, image = backends_of(quantization_config)
    return {"method": method, "backend": text, "image_backend": image}


def activation_bits(quantization_config) -> Optional[dict]:
    """{"text": bits, "image": bits} of the activations under `quantization_config` (None without
    quantization): what shapes captions beyond the integers, recorded by `gitfast caption --resume`."""
    if method_of(quantization_config) is None:
        return None
    text, image = backends_of(quantization_config)
    return {"text": int8_backends.activation_bits(text), "image": int8_backends.activation_bits(image)}


def image_rows():
    """A context in which DynamicInt8Linear layers serve image tokens' rows (their image backend): the
    decoder's pass over an image prefix (serving.paged_runner.encode_prefixes). Per thread and task."""
    return _ImageRows()


class _ImageRows:
    def __enter__(self):
        self._token = _IMAGE_ROWS.set(True)

    def __exit__(self, *exc):
        _IMAGE_ROWS.reset(self._token)


_IMAGE_ROWS = contextvars.ContextVar("gitfast_int8_image_rows", default=False)


# -- the row passes -------------------------------------------------------------------------------

def quantize_rows_reference(x: torch.Tensor):
    """Per-row symmetric int8: (q, scale) with q = round(x * 127 / max|x|), scale = max|x| / 127."""
    xf = x.float()
    m = xf.abs().amax(-1)
    inv = torch.where(m > 0, 127.0 / m, torch.zeros_like(m))
    return torch.round(xf * inv[..., None]).to(torch.int8), m / 127.0


def quantize_rows_u7_reference(x: torch.Tensor):
    """Per-row asymmetric 7-bit: (q uint8 in 0..127, scale, zero int32) with x ~ scale * (q - zero);
    the row's range is widened to hold 0, so zeros stay exact."""
    xf = x.float()
    lo, hi = xf.amin(-1).clamp(max=0), xf.amax(-1).clamp(min=0)
    span = hi - lo
    inv = torch.where(span > 0, 127.0 / span, torch.zeros_like(span))
    zero = torch.round(-lo * inv)
    q = torch.clamp(torch.round(xf * inv[..., None]) + zero[..., None], 0, 127)
    return q.to(torch.uint8), span / 127.0, zero.to(torch.int32)


def dequantize_rows_reference(acc, row_scale, col_scale, bias, activation, dtype):
    y = acc.float() * row_scale[:, None]
    if col_scale is not None:
        y = y * col_scale
    if bias is not None:
        y = y + bias.float()
    return (y if activation is None else ops.activation_reference(y, activation)).to(dtype)


def requantize_rows_u7_reference(acc, row_scale, col_scale, bias, activation, dtype):
    """The next 7-bit layer's input from this layer's accumulators: the two passes it stands for."""
    return quantize_rows_u7_reference(dequantize_rows_reference(acc, row_scale, col_scale, bias, activation, dtype))


def _use_extension(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and ops.backend("bias_act", "cpu") == "cpu ext" and hasattr(
        torch.ops.gitfast, "quantize_rows")


def quantize_rows(x: torch.Tensor):
    if _use_extension(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.ops.gitfast.quantize_rows(x.contiguous())
    return quantize_rows_reference(x)


def quantize_rows_u7(x: torch.Tensor):
    if _use_extension(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.ops.gitfast.quantize_rows_u7(x.contiguous())
    return quantize_rows_u7_reference(x)


def dequantize_rows(acc, row_scale, col_scale, bias, activation, dtype):
    if _use_extension(acc):
        return torch.ops.gitfast.dequantize_rows(acc.contiguous(), row_scale.contiguous(), col_scale, bias,
                                                 activation, dtype)
    return dequantize_rows_reference(acc, row_scale, col_scale, bias, activation, dtype)


def requantize_rows_u7(acc, row_scale, col_scale, bias, activation, dtype):
    """`quantize_rows_u7(dequantize_rows(...))` in one pass over the rows (gitfast._C): the same q,
    scale and zero point, without writing and reading back the float rows between two layers."""
    if _use_extension(acc) and hasattr(torch.ops.gitfast, "requantize_rows_u7"):
        return torch.ops.gitfast.requantize_rows_u7(acc.contiguous(), row_scale.contiguous(), col_scale, bias,
                                                    activation, dtype)
    return requantize_rows_u7_reference(acc, row_scale, col_scale, bias, activation, dtype)


class DynamicInt8Linear(nn.Module):
    """`act(x W^T + b)` with W in int8 (a scale per output channel) and x quantized per row (token)
    at each call; outputs in x's dtype. Inference only (no autograd)."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 backend_name: Optional[str] = None, image_backend: Optional[str] = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.use(backend_name or int8_backends.backend(), image_backend)

    def use(self, name: str, image: Optional[str] = None) -> None:
        """Serve this layer's rows with backend `name`, image tokens' rows (see image_rows) with `image`
        (default: the same); tests and benchmarks compare backends on one layer."""
        self.backend, self.image_backend = name, image or name
        self._weights = {b: int8_backends.Int8Weight(b, self.weight_int8) for b in {self.backend, self.image_backend}}

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend_name: Optional[str] = None,
                    image_backend: Optional[str] = None) -> "DynamicInt8Linear":
        w = linear.weight.detach().float()
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        w_int8 = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(w_int8, scale, linear.bias, backend_name, image_backend)

    def extra_repr(self) -> str:
        image = "" if self.image_backend == self.backend else f", image_backend={self.image_backend}"
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}{image}"

    def serving(self) -> str:
        """The backend serving this call's rows."""
        return self.image_backend if _IMAGE_ROWS.get() else self.backend

    def forward(self, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
        acc, s, col = self._products(self._rows(x), self.serving())
        y = dequantize_rows(acc, s, col, self.bias, activation, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def feed_forward(self, x: torch.Tensor, fc2: nn.Module, activation: str) -> torch.Tensor:
        """`fc2(act(self(x)))`. Where `fc2` is a DynamicInt8Linear taking 7-bit rows (image tokens'),
        this layer's dequantize pass makes them directly (`requantize_rows_u7`: the same bits as the two
        passes), and the [rows, out_features] float activations between the layers are never written.
        Zen 3, INT8 caption profile, 32 images: the two passes over [2561, 3072] took 17 ms per MLP, the
        one pass 6.5 ms."""
        if not (isinstance(fc2, DynamicInt8Linear) and fc2.serving() in int8_backends.SEVEN_BIT):
            return fc2(self(x, activation))
        acc, s, col = self._products(self._rows(x), self.serving())
        q, s, zero = requantize_rows_u7(acc, s, col, self.bias, activation, x.dtype)
        acc, s, col = fc2._products_of(q, s, zero, fc2.serving())
        y = dequantize_rows(acc, s, col, fc2.bias, None, x.dtype)
        return y.view(*x.shape[:-1], fc2.out_features)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"DynamicInt8Linear runs on the CPU only; got input on {x.device}")
        return x.reshape(-1, self.in_features)

    def _products(self, rows: torch.Tensor, name: str):
        """(acc, row scale, column scale) of float `rows` quantized as backend `name` takes them."""
        if name in int8_backends.SEVEN_BIT:
            return self._products_of(*quantize_rows_u7(rows), name)
        return self._products_of(*quantize_rows(rows), None, name)

    def _products_of(self, q, s, zero, name: str):
        acc, col = self._weights[name].products(q, zero, self.weight_scale)
        return acc, s, col

    def reference(self, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
        """The same layer in plain torch (tests' ground truth), with this call's activation bits."""
        rows = x.reshape(-1, self.in_features)
        if self.serving() in int8_backends.SEVEN_BIT:
            q, s, zero = quantize_rows_u7_reference(rows)
        else:
            (q, s), zero = quantize_rows_reference(rows), None
        acc = int8_backends.reference_products(q, zero, self.weight_int8)
        y = dequantize_rows_reference(acc, s, self.weight_scale, self.bias, activation, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module, quantization_config="dynamic", keep=KEEP) -> nn.Module:
    """Swaps every `ops.Linear` of `model` (a GitModel, on the CPU) whose name is not in `keep` for a
    DynamicInt8Linear, in place; returns `model`. None leaves it as it is. The GEMM backends are those
    measured here (int8_backends: one for text tokens' rows, one for image tokens'), or those the
    config names (`{"method": "dynamic", "backend": ..., "image_backend": ...}`)."""
    if method_of(quantization_config) is None:
        return model
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise ValueError(f"quantization_config={quantization_config!r} (dynamic INT8) runs on the CPU only, but the "
                         f"model is on {p.device}; on a GPU use dtype=torch.float16 or torch.bfloat16 instead")
    text, image = backends_of(quantization_config)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, ops.Linear) and name not in keep]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        only_images = name.startswith(IMAGE_ONLY)
        layer = DynamicInt8Linear.from_linear(linear, image if only_images else text, image)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    for name, m in model.named_modules():
        if isinstance(m, ops.Logits) and name in keep:
            m.reads_bf16 = bf16_backends.kernel_serves_logits()
    return model


def describe(model: nn.Module) -> Optional[str]:
    """"dynamic INT8 (<n> layers; text rows: <backend>, <bits>-bit activations; image rows: ...)" when
    `model` holds DynamicInt8Linear layers, else None."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicInt8Linear)]
    if not layers:
        return None
    text = sorted({m.backend for n, m in layers if not n.startswith(IMAGE_ONLY)})
    image = sorted({m.image_backend for _, m in layers})
    rows = [f"{kind} rows: {', '.join(f'{b} ({int8_backends.activation_bits(b)}-bit activations)' for b in names)}"
            for kind, names in (("text", text), ("image", image))]
    return f"dynamic INT8 ({len(layers)} layers; {'; '.join(rows)})"
