"""Fused ops used by the model, one function each, with the plain-torch reference beside it.

The reference functions (`*_reference`) are the ground truth in tests and the fallback when no
faster backend is built. The public functions pick the fastest available backend for the inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("quick_gelu", "gelu")


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


def add_layer_norm(x, residual, weight, bias, eps):
    """`summed = x + residual` (just `x` when residual is None); returns `(LayerNorm(summed), summed)`."""
    return add_layer_norm_reference(x, residual, weight, bias, eps)


def bias_act(x, bias, activation):
    """`activation(x + bias)` with activation in {"quick_gelu", "gelu"}."""
    return bias_act_reference(x, bias, activation)


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation):
    """`fc2(activation(fc1(x)))`."""
    return mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)
