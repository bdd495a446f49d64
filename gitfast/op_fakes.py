"""Shape-only implementations of gitfast._C's custom ops, for torch.compile and FakeTensor tracing
(and torch.library.opcheck): one per op whose output shape the tracer cannot know.
"""
from __future__ import annotations

import torch


def register() -> None:
    """Registers them, once, after gitfast._C has loaded (ops.extension_loaded)."""

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

    if hasattr(torch.ops.gitfast, "int8_mm"):
        @torch.library.register_fake("gitfast::int8_mm")
        def _(q, w):
            return q.new_empty((q.shape[0], w.shape[0]), dtype=torch.int32)

    if hasattr(torch.ops.gitfast, "int8_mm_u7_packed"):
        @torch.library.register_fake("gitfast::pack_u7_weight")
        def _(w):
            return w.new_empty(((w.shape[0] + 15) // 16, (w.shape[1] + 3) // 4, 16, 4))

        @torch.library.register_fake("gitfast::int8_mm_u7_packed")
        def _(q, zero, packed, colsum):
            return q.new_empty((q.shape[0], colsum.shape[0]), dtype=torch.int32)

    if hasattr(torch.ops.gitfast, "int8_mm_vnni"):
        @torch.library.register_fake("gitfast::int8_mm_vnni")
        def _(q, packed, colsum):
            return q.new_empty((q.shape[0], colsum.shape[0]), dtype=torch.int32)

    if hasattr(torch.ops.gitfast, "linear_fp32"):
        @torch.library.register_fake("gitfast::linear_fp32")
        def _(x, w, bias, activation=None):
            return x.new_empty((*x.shape[:-1], w.shape[0]))

    if hasattr(torch.ops.gitfast, "linear_bf16"):
        @torch.library.register_fake("gitfast::pack_bf16_cols")
        def _(w):
            return w.new_empty(((w.shape[0] + 31) // 32 * 2, (w.shape[1] + 1) // 2, 16, 2))

        @torch.library.register_fake("gitfast::linear_bf16")
        def _(x, packed, n, bias, fp32_out=True):
            return x.new_empty((*x.shape[:-1], n), dtype=torch.float32 if fp32_out else torch.bfloat16)
