"""Fused ops used by the model, one function each, with the plain-torch reference beside it.

The reference functions (`*_reference`) are the ground truth in tests and the fallback when no
faster backend is built. The public functions pick a backend per call:

- the compiled extension `gitfast._C` (custom ops `torch.ops.gitfast.*`, CPU kernels always built,
  CUDA kernels when built with a CUDA toolkit), for float32 / float16 / bfloat16 inputs;
- the reference otherwise: no extension (warned once per process), another device or dtype, or
  an input that requires grad (the custom ops have no backward; the reference keeps autograd).

The custom ops carry fake (meta) implementations, so they trace under torch.compile and record into
CUDA graphs. The raw ops are strict (contiguous, one dtype, matching shapes; errors say which input
is wrong); the public functions make inputs contiguous first.
"""
from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16_backends, fp32_backends, op_fakes

ACTIVATIONS = ("quick_gelu", "gelu")
OPS = ("add_layer_norm", "bias_act", "mlp")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The CUDA LayerNorm keeps a row of fp32 in shared memory; wider rows use the reference.
_CUDA_MAX_LN_WIDTH = 8192  # kMaxLayerNormWidth in csrc/cuda/norm_act.cu


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {ACTIVATIONS}")


def activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    _check_activation(activation)
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)  # exact (erf) GELU, as the GIT checkpoints use


def add_layer_norm_reference(x, residual, weight, bias, eps):
    summed = x if residual is None else x + residual
    return F.layer_norm(summed, (summed.shape[-1],), weight, bias, eps), summed


def bias_act_reference(x, bias, activation):
    return activation_reference(x if bias is None else x + bias, activation)


def mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation):
    return F.linear(activation_reference(F.linear(x, fc1_weight, fc1_bias), activation), fc2_weight, fc2_bias)


# -- the extension --------------------------------------------------------------------------------

_extension_state: bool | None = None  # None: not tried yet
_devices_with_kernels: frozenset = frozenset()


def _import_extension():
    return importlib.import_module("gitfast._C")


def extension_loaded() -> bool:
    """Whether `gitfast._C` imported (once per process; a failure warns once and sticks)."""
    global _extension_state, _devices_with_kernels
    if _extension_state is None:
        try:
            _import_extension()
        except ImportError as exc:
            _extension_state = False
            warnings.warn(
                f"gitfast._C is not available ({exc}); gitfast runs its plain-torch reference ops. "
                "Build it with `pip install --no-build-isolation -e .` (needs a C++ compiler).",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            op_fakes.register()
            has = torch._C._dispatch_has_kernel_for_dispatch_key
            _devices_with_kernels = frozenset(
                dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("gitfast::bias_act", key)
            )
            _extension_state = True
    return _extension_state


def extension():
    """The `gitfast._C` module, or None where it is not built: the one way gitfast loads it (the
    attention's C++ kernels and `gitfast info` ask here)."""
    return _import_extension() if extension_loaded() else None


def backend(op: str, device) -> str:
    """Which implementation serves `op` for tensors on `device`: "cuda ext", "cpu ext" or "reference"."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    kind = torch.device(device).type
    if extension_loaded() and kind in _devices_with_kernels:
        return f"{kind} ext"
    return "reference"


def _use_extension(op: str, x: torch.Tensor, *others) -> bool:
    if x.dtype not in _DTYPES or backend(op, x.device) == "reference":
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return False  # the custom ops have no backward
    return True


# -- the public ops -------------------------------------------------------------------------------


def add_layer_norm(x, residual, weight, bias, eps):
    """`summed = x + residual` (just `x` when residual is None); returns `(LayerNorm(summed), summed)`."""
    if (
        weight is not None
        and bias is not None
        and not (x.is_cuda and x.shape[-1] > _CUDA_MAX_LN_WIDTH)
        and _use_extension("add_layer_norm", x, residual, weight, bias)
    ):
        x = x.contiguous()
        if residual is None:
            return torch.ops.gitfast.layer_norm(x, weight.contiguous(), bias.contiguous(), eps), x
        normed, summed = torch.ops.gitfast.add_layer_norm(
            x, residual.contiguous(), weight.contiguous(), bias.contiguous(), eps
        )
        return normed, summed
    return add_layer_norm_reference(x, residual, weight, bias, eps)


def bias_act(x, bias, activation):
    """`activation(x + bias)` with activation in {"quick_gelu", "gelu"}."""
    _check_activation(activation)
    if _use_extension("bias_act", x, bias):
        return torch.ops.gitfast.bias_act(x.contiguous(), None if bias is None else bias.contiguous(), activation)
    return bias_act_reference(x, bias, activation)


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation):
    """`fc2(activation(fc1(x)))`: GEMM, fused bias + activation, GEMM with bias."""
    _check_activation(activation)
    if _use_extension("mlp", x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        c = torch.Tensor.contiguous
        return torch.ops.gitfast.mlp(
            c(x), c(fc1_weight), None if fc1_bias is None else c(fc1_bias),
            c(fc2_weight), None if fc2_bias is None else c(fc2_bias), activation,
        )
    return mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)


# -- linear layers ---------------------------------------------------------------------------------


def linear_backend(device, dtype) -> str:
    """What serves `Linear` for `dtype` weights on `device`: "onednn packed" or "fp32 upcast" (with the
    extension's kernel at up to `bf16_backends.narrow_rows()` rows where it measured faster) or "torch"."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return "torch"
    wide = bf16_backends.wide_linear()
    narrow = bf16_backends.kernel_serves_narrow_linear()
    return f"{wide}; cpu ext at <= {bf16_backends.narrow_rows()} rows" if narrow else wide


def _bf16_served(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a bf16 CPU inference call takes a measured bf16 backend rather than plain F.linear."""
    return x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu" \
        and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) \
        and not torch.compiler.is_compiling() and bf16_backends.wide_linear() != "torch"


def _fp32_backend(x: torch.Tensor, w: torch.Tensor, b) -> str:
    """The backend an fp32 Linear on `x` takes (fp32_backends): CPU inference at up to
    MIDDLE_MAX_ROWS rows (decode steps) takes its row band's measured one (fp32_backends.backend); anything
    else, and prefill and image rows, F.linear ("torch")."""
    if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" \
            and 0 < x.numel() <= fp32_backends.MIDDLE_MAX_ROWS * x.shape[-1] and w.is_contiguous() \
            and (b is None or (b.dtype == torch.float32 and b.is_contiguous())) \
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) \
            and not torch.compiler.is_compiling():
        return fp32_backends.backend(x.numel() // x.shape[-1], w.numel())
    return "torch"


def logits_backend(device) -> str:
    """What serves `Logits` for a bf16 model (and for dynamic INT8's LM head) on `device`: the
    extension's bf16 kernel at up to `Logits.KERNEL_ROWS` rows where it measured faster (the
    decision `Logits.forward` reads), else an fp32 GEMM on an upcast copy of the weight."""
    if torch.device(device).type != "cpu":
        return "torch"
    if bf16_backends.kernel_serves_logits():
        return f"cpu ext at <= {Logits.KERNEL_ROWS} rows; torch fp32 above"
    return "torch fp32"


class Linear(nn.Linear):
    """`nn.Linear` with an optional fused activation, `act(x W^T + b)`, whose CPU bf16 inference GEMM
    takes the backend measured fastest here (gitfast.bf16_backends, decided once per process): a oneDNN
    pre-packed copy of the weight, made once and remade only when the weight changes; MKL's fp32 GEMM
    on the values widened for the call (CPUs without bf16 arithmetic); or plain F.linear.

    Plain `F.linear` on a bf16 CPU tensor hands oneDNN the weight in nn.Linear's layout, and oneDNN
    re-lays it out on every call: 1.3-1.9x slower per GEMM at git-base's shapes (M = 8 decode rows
    and M = 1576 vision rows, AMX; bench/bench_cpu.py). The packed copy costs the weight's memory
    again (bf16 only). CUDA, autograd and tracing take `F.linear` unchanged, and so does fp32 beyond
    decode rows.

    fp32 CPU inference at up to `fp32_backends.MIDDLE_MAX_ROWS` rows (decode steps) takes the backend its
    row band measured fastest: the extension's fp32 kernel (csrc/cpu/linear_fp32.cpp: the weight read once
    per call at any row count, the activation fused), MKL called with the operands swapped, or F.linear.

    At up to `bf16_backends.narrow_rows()` rows (decode steps) the extension's bf16 kernel on its own
    packed copy serves instead, where it measured faster: on AVX512-BF16 oneDNN reads the weights slower at
    one to four rows (one decode step's 24 GEMMs, 85 MB, caches flushed: 6.3-8.3 ms oneDNN, 4.4-5.2 ms the
    kernel at one row; 1.29x at two rows, 1.18x at four, oneDNN faster from eight); without bf16
    arithmetic it beats the upcast GEMM up to about 64 rows. Layers that also run wider (the decoder's,
    for prompts and image prefixes) then hold both copies.
    """

    _packed = None  # (weight identity, packed mkldnn tensor); a class default, so meta init stays free
    _narrow = None  # (weight identity, packed bf16 weight for the extension's kernel, fp32 bias)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        w = self.weight
        if _bf16_served(x, w):
            return self._bf16(x, activation)
        how = _fp32_backend(x, w, self.bias)
        if how == "cpu ext":
            return torch.ops.gitfast.linear_fp32(x.contiguous(), w, self.bias, activation)
        y = fp32_backends.swapped_linear(x, w, self.bias) if how == "torch swapped" else F.linear(x, w, self.bias)
        return y if activation is None else bias_act(y, None, activation)

    def _bf16(self, x: torch.Tensor, activation: str | None) -> torch.Tensor:
        """A bf16 CPU inference call through the measured backends (bf16_backends)."""
        w, wide = self.weight, bf16_backends.wide_linear()
        if x.numel() <= bf16_backends.narrow_rows() * x.shape[-1] and type(self) is Linear \
                and bf16_backends.kernel_serves_narrow_linear():
            y = torch.ops.gitfast.linear_bf16(x.contiguous(), self._kernel_weight(), w.shape[0], self._narrow[2],
                                              False)
            return y if activation is None else bias_act(y, None, activation)
        if wide == "fp32 upcast":  # activation in fp32, one rounding to bf16
            y = bf16_backends.upcast_linear(x, w, self.bias)
            return (y if activation is None else bias_act(y, None, activation)).bfloat16()
        if activation == "gelu":  # oneDNN's erf GELU post-op: one pass less over the output
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "gelu", [], "none")
        y = torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
        return y if activation is None else bias_act(y, None, activation)

    def _kernel_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, None if self.bias is None else self.bias._version)
        if self._narrow is None or self._narrow[0] != key:
            bias = None if self.bias is None else self.bias.detach().float()
            self._narrow = (key, torch.ops.gitfast.pack_bf16_cols(w.detach().contiguous()), bias)
        return self._narrow[1]

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.shape)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8))
        return self._packed[1]


class Logits(Linear):
    """The LM head. On the CPU, bf16 weights give fp32 logits: bf16 logits keep 8 mantissa bits, steps
    of 0.06-0.125 at the logit sizes greedy decoding compares, and their ties flip choices. git-base
    shapes, random weights, 32 images x 20 tokens: bf16 captions identical to fp32's 11/32 with bf16
    logits, 16/32 with fp32 ones (transformers' bf16: 14/32).

    Products of bf16 values are exact in fp32, so the fp32 logits come from the bf16 weight itself:
    up to 32 rows (decode steps of up to 32 sequences: the Captioner's default batch) through the
    extension's bf16 x bf16 -> fp32 kernel on a packed copy of the weight (`linear_bf16`,
    csrc/cpu/logits.cpp: half the bytes of an fp32 GEMM's weight; git-base head, 2 cores: 0.5x its time
    at 1 row, 0.4x at 8, 0.8x at 24, level at 32); more rows (a forward over whole sequences) through
    an fp32 GEMM on an upcast copy, where MKL's fp32 GEMM is the faster. Each copy is made once, on
    first use."""

    _wide = None    # (weight identity, fp32 weight, fp32 bias)
    _narrow = None  # (weight identity, packed bf16 weight, fp32 bias)
    KERNEL_ROWS = 32
    # Set by gitfast.quantization on native-bf16 CPUs: fp32 inputs and weights also take the bf16
    # kernel (both rounded to bf16 once, fp32 accumulation and logits)
    reads_bf16 = False

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        w = self.weight
        narrowed = self.reads_bf16 and x.dtype == torch.float32 and w.dtype == torch.float32
        if not (x.dtype == torch.bfloat16 or narrowed) or x.device.type != "cpu" or activation is not None or \
                (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return super().forward(x, activation)
        key = (w.data_ptr(), w._version, None if self.bias is None else self.bias._version)
        rows = x.numel() // max(x.shape[-1], 1)
        # measured: on CPUs without AVX512-BF16 the kernel's portable path lost to MKL's fp32 GEMM
        # beyond a row or two (2.3x slower at 32 rows), and the fp32 GEMM serves there
        if rows <= self.KERNEL_ROWS and not torch.compiler.is_compiling() and bf16_backends.kernel_serves_logits():
            if self._narrow is None or self._narrow[0] != key:
                self._narrow = (key, torch.ops.gitfast.pack_bf16_cols(w.detach().bfloat16().contiguous()),
                                self._float_bias())
            return torch.ops.gitfast.linear_bf16(x.bfloat16().contiguous(), self._narrow[1], w.shape[0],
                                                 self._narrow[2])
        if narrowed:
            return super().forward(x, activation)
        if self._wide is None or self._wide[0] != key:
            self._wide = (key, w.detach().float(), self._float_bias())
        return F.linear(x.float(), self._wide[1], self._wide[2])

    def _float_bias(self):
        return None if self.bias is None else self.bias.detach().float()


def patch_conv(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """The vision embedding's strided convolution. Where bf16 Linear layers take the fp32 upcast (a
    CPU without bf16 arithmetic), the convolution is widened the same way and rounded once: on AMD
    Zen 3, 8 images at 224 px take 530 ms in bf16 and 16 ms widened (2 threads)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.compiler.is_compiling() \
            and bf16_backends.wide_linear() == "fp32 upcast":
        return F.conv2d(x.float(), w.float(), stride=stride).bfloat16()
    return F.conv2d(x, w, stride=stride)


def feed_forward(x: torch.Tensor, fc1: nn.Module, fc2: nn.Module, activation: str) -> torch.Tensor:
    """`fc2(act(fc1(x)))` over linear layers: the fused `mlp` op when both are plain `Linear`s whose
    weights it serves best (fp32, fp16, CUDA), else each layer's own forward with the activation
    fused into the first (packed bf16, fp32 decode rows), or the first layer's own `feed_forward` where
    it has one (gitfast.quantization's INT8 layers hand the second its quantized input)."""
    if type(fc1) is Linear and type(fc2) is Linear and not _bf16_served(x, fc1.weight) \
            and _fp32_backend(x, fc1.weight, fc1.bias) == "torch":
        return mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation)
    chained = getattr(fc1, "feed_forward", None)
    return chained(x, fc2, activation) if chained is not None else fc2(fc1(x, activation))


# Load now rather than on the first call: that call may be inside torch.compile's tracing, which
# cannot import modules.
extension_loaded()
