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


def _register_fakes() -> None:
    """Shape-only implementations of the custom ops, for torch.compile / FakeTensor tracing."""

    @torch.library.register_fake("gitfast::layer_norm")
    def _(x, weight, bias, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("gitfast::add_layer_norm")
    def _(x, residual, weight, bias, eps):
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake("gitfast::bias_act")
    def _(x, bias, activation):
        return torch.empty_like(x)

    @torch.library.register_fake("gitfast::mlp")
    def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation):
        return x.new_empty((*x.shape[:-1], fc2_weight.shape[0]))


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
            _register_fakes()
            has = torch._C._dispatch_has_kernel_for_dispatch_key
            _devices_with_kernels = frozenset(
                dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("gitfast::bias_act", key)
            )
            _extension_state = True
    return _extension_state


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


# Load now rather than on the first call: that call may be inside torch.compile's tracing, which
# cannot import modules.
extension_loaded()
