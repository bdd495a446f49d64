"""The fused ops of gitfast._C: add + LayerNorm, bias + activation, and the transformer MLP.

Providers: `gitfast` (`gitfast.ops.*`, the extension's kernels for this device), `torch` (the eager
composition the model would otherwise run: `x + r` then `F.layer_norm`; `x + b` then the
activation; `F.linear`, activation, `F.linear`) and `torch.compile` (the same composition compiled
by Inductor).

Shapes (tokens = rows): on a GPU a git-base batch of 256 images x 217 tokens (197 image + 20 text),
on the CPU 2 x 217, in quick mode 37. Widths are git-base's: 768 wide, MLP 768 -> 3072 -> 768 with
quick-GELU (vision encoder) and exact GELU (text decoder). Bytes are the minimum one call moves:
LayerNorm reads x and the residual and writes the normalised row and the sum; bias + activation
reads x and writes the result; the MLP reads x and both weights and writes the output. MLP FLOPs
are the two GEMMs.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .common import Case
from .timing import copies_for, rotating

SUITE = "ops"
WIDTH, HIDDEN = 768, 3072


def _tokens(quick: bool, device: str):
    if quick:
        return [("T37", 37)]
    if torch.device(device).type == "cuda":
        return [("B256x217", 256 * 217)]
    return [("B2x217", 2 * 217)]


def _gitfast_skip_reason(op: str, device: str):
    from gitfast import ops

    if not ops.extension_loaded():
        return "gitfast._C is not built"
    if ops.backend(op, device) == "reference":
        return f"gitfast._C was built without {torch.device(device).type} kernels"
    return None


# The eager compositions (also what torch.compile compiles).
def _torch_add_layer_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, 1e-5), s


def _torch_quick_gelu(x, b):
    v = x + b
    return v * torch.sigmoid(1.702 * v)


def _torch_gelu(x, b):
    return F.gelu(x + b)


def _torch_mlp_quick_gelu(x, w1, b1, w2, b2):
    h = F.linear(x, w1, b1)
    return F.linear(h * torch.sigmoid(1.702 * h), w2, b2)


def _torch_mlp_gelu(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    from gitfast import ops

    elt = torch.tensor([], dtype=dtype).element_size()
    dt = str(dtype).replace("torch.", "")

    def providers(benchmark, label, shape, op, gitfast_fn, torch_fn, inputs, nbytes, flops=None):
        def case(provider, fn, reason=None):
            return Case(benchmark, shape, provider, dt, fn if reason is None else None, flops=flops, bytes=nbytes,
                        skip_reason=reason, label=label)

        reason = _gitfast_skip_reason(op, device)
        yield case("gitfast", (lambda: gitfast_fn(*inputs.next())) if reason is None else None, reason)
        yield case("torch", lambda: torch_fn(*inputs.next()))
        compiled = torch.compile(torch_fn, dynamic=False)  # compiles on its first (warm-up) call
        yield case("torch.compile", lambda: compiled(*inputs.next()))

    for label, tokens in _tokens(quick, device):
        def randn(*shape, scale=1.0):
            return torch.randn(*shape, device=device, dtype=dtype) * scale

        # -- add + LayerNorm, [tokens, 768] --
        nbytes = 4.0 * tokens * WIDTH * elt
        w, b = randn(WIDTH, scale=0.1) + 1, randn(WIDTH, scale=0.1)
        inputs = rotating(lambda: (randn(tokens, WIDTH), randn(tokens, WIDTH), w, b), copies_for(nbytes, device))
        yield from providers(
            "add_layer_norm", label, {"tokens": tokens, "width": WIDTH}, "add_layer_norm",
            lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5), _torch_add_layer_norm, inputs, nbytes,
        )

        # -- bias + activation on the MLP's hidden activations, [tokens, 3072] --
        nbytes = 2.0 * tokens * HIDDEN * elt
        bias = randn(HIDDEN)
        inputs = rotating(lambda: (randn(tokens, HIDDEN, scale=3.0), bias), copies_for(nbytes, device))
        for activation, torch_fn in (("quick_gelu", _torch_quick_gelu), ("gelu", _torch_gelu)):
            yield from providers(
                f"bias_{activation}", label, {"tokens": tokens, "width": HIDDEN}, "bias_act",
                lambda x, b, a=activation: ops.bias_act(x, b, a), torch_fn, inputs, nbytes,
            )

        # -- MLP 768 -> 3072 -> 768: vision (quick-GELU) and text decoder (GELU) --
        flops = 2.0 * 2.0 * tokens * WIDTH * HIDDEN
        nbytes = (2.0 * tokens * WIDTH + 2.0 * WIDTH * HIDDEN) * elt
        weights = (randn(HIDDEN, WIDTH, scale=WIDTH**-0.5), randn(HIDDEN, scale=0.1),
                   randn(WIDTH, HIDDEN, scale=HIDDEN**-0.5), randn(WIDTH, scale=0.1))
        inputs = rotating(lambda: (randn(tokens, WIDTH), *weights), copies_for(tokens * WIDTH * elt, device))
        for name, activation, torch_fn in (("mlp_vision", "quick_gelu", _torch_mlp_quick_gelu),
                                           ("mlp_decoder", "gelu", _torch_mlp_gelu)):
            yield from providers(
                name, label, {"tokens": tokens, "width": WIDTH, "hidden": HIDDEN, "activation": activation}, "mlp",
                lambda x, w1, b1, w2, b2, a=activation: ops.mlp(x, w1, b1, w2, b2, a), torch_fn, inputs, nbytes,
                flops,
            )
