"""GIT attention: varlen prefix-LM prefill (image block + causal text) and vision-encoder attention.

Providers: `gitfast` (Triton `git_attention` on packed tokens), `torch` (eager, as transformers:
materialised scores + additive mask), `sdpa_mask` (SDPA with the boolean mask), `flex`
(FlexAttention with a prefix-LM block mask, compiled), `sdpa_flash_nomask` (SDPA without a mask on
the dense layout: wrong semantics for the decoder, a lower bound on what a fused kernel can do).
FLOPs count only the allowed (query, key) pairs; bytes are q, k, v read and out written once.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from .common import Case, triton_skip_reason
from .timing import copies_for, rotating

SUITE = "git_attention"
HEAD_DIM = 64

# (label, batch, image tokens, text tokens, heads)
FULL_SHAPES = [
    ("dec base B256 197+20", 256, 197, 20, 12),      # git-base decoder prefill
    ("dec large B256 257+20", 256, 257, 20, 12),     # git-large decoder prefill (decoder is 12 heads)
    ("vis base B256 197", 256, 197, 0, 12),          # git-base vision encoder
    ("vis large B256 257", 256, 257, 0, 16),         # git-large vision encoder
    ("dec VQA B64 901+20", 64, 901, 20, 12),         # long image prefix (e.g. video / textvqa)
]
QUICK_SHAPES = [
    ("dec B2 17+5", 2, 17, 5, 2),
    ("vis B2 13", 2, 13, 0, 2),
]


def _allowed_pairs(image: int, text: int) -> int:
    return image * image + text * image + text * (text + 1) // 2


def _prefix_lm_mask(length: int, image: int, device) -> torch.Tensor:
    """[L, L] bool, True = attend: key j visible to query i iff j < max(image, i + 1)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return j < torch.clamp(i + 1, min=image)



def _flex_fn(image: int, batch: int, heads: int, length: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < image) | (kv_idx <= q_idx)

    block_mask = create_block_mask(prefix_lm, None, None, length, length, device=device)
    return torch.compile(flex_attention, dynamic=False), block_mask


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    dt = str(dtype).replace("torch.", "")
    for label, batch, image, text, heads in QUICK_SHAPES if quick else FULL_SHAPES:
        length = image + text
        shape = {"batch": batch, "image": image, "text": text, "heads": heads, "head_dim": HEAD_DIM}
        total = batch * length
        flops = 4.0 * HEAD_DIM * heads * batch * _allowed_pairs(image, text)
        io_bytes = 4.0 * total * heads * HEAD_DIM * elt
        dense_flops = 4.0 * HEAD_DIM * heads * batch * length * length
        n_sets = copies_for(3 * total * heads * HEAD_DIM * elt, device)

        def make(batch=batch, length=length, heads=heads):
            # dense [B, H, L, D] views over packed [B*L, H, D] storage: both layouts, one tensor
            return tuple(torch.randn(total, heads, HEAD_DIM, device=device, dtype=dtype)
                         for _ in range(3))

        inputs = rotating(make, n_sets)
        cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * length
        scale = 1.0 / math.sqrt(HEAD_DIM)

        def dense(x, batch=batch, length=length, heads=heads):
            return x.view(batch, length, heads, HEAD_DIM).transpose(1, 2)

        def case(provider, fn, skip=None, flops_=flops, note=None):
            extra = {"note": note} if note else {}
            return Case(SUITE, shape, provider, dt, None if skip else fn, flops=flops_, bytes=io_bytes,
                        skip_reason=skip, label=label, extra=extra)

        # gitfast
        skip = triton_skip_reason(device)
        if skip is None:
            from gitfast.kernels.api import git_attention

            def run_gitfast(cu=cu, image=image, length=length, inputs=inputs):
                q, k, v = inputs.next()
                return git_attention(q, k, v, cu, image, max_seqlen=length)
            yield case("gitfast", run_gitfast)
        else:
            yield case("gitfast", None, skip)

        mask = _prefix_lm_mask(length, image, device)
        additive = torch.zeros(length, length, device=device, dtype=dtype).masked_fill(
            ~mask, torch.finfo(dtype).min)

        # torch eager, as transformers' eager attention: scores materialised, additive mask
        def run_torch(inputs=inputs, additive=additive, dense=dense):
            q, k, v = (dense(x) for x in inputs.next())
            s = torch.matmul(q, k.transpose(-1, -2)) * scale + additive
            return torch.matmul(torch.softmax(s, dim=-1), v)
        yield case("torch", run_torch)

        def run_sdpa_mask(inputs=inputs, mask=mask, dense=dense):
            q, k, v = (dense(x) for x in inputs.next())
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        yield case("sdpa_mask", run_sdpa_mask)

        if device == "cuda":
            try:
                flex, block_mask = _flex_fn(image, batch, heads, length, device)

                def run_flex(inputs=inputs, flex=flex, block_mask=block_mask, dense=dense):
                    q, k, v = (dense(x) for x in inputs.next())
                    return flex(q, k, v, block_mask=block_mask)
                yield case("flex", run_flex)
            except Exception as exc:  # noqa: BLE001 - an old torch without flex is a skip, not a crash
                yield case("flex", None, f"flex_attention unavailable: {exc!r}"[:200])
        else:
            yield case("flex", None, "flex_attention is benchmarked on CUDA only (CPU compile is slow)")

        def run_nomask(inputs=inputs, dense=dense):
            q, k, v = (dense(x) for x in inputs.next())
            return F.scaled_dot_product_attention(q, k, v)
        note = None if text == 0 else "no mask: wrong semantics, a lower bound"
        yield case("sdpa_flash_nomask", run_nomask, flops_=dense_flops, note=note)
