"""Scatter new keys/values into the paged KV cache.

Computes, for every token t with slot = slot_mapping[t] >= 0,

    k_cache[slot // block_size, slot % block_size] = k[t]
    v_cache[slot // block_size, slot % block_size] = v[t]

and leaves the cache untouched for slot < 0 (padding tokens, or image tokens whose prefix is already
cached and shared).

Layout: k, v `[num_tokens, heads, head_dim]` (any token/head strides, head_dim packed); caches
`[num_blocks, block_size, heads, head_dim]`; slot_mapping int64 `[num_tokens]`. Values are cast to
the cache dtype on store.

Design: one program per token copies all heads of that token for both K and V as one
`[heads, head_dim]` tile (padded to powers of two, masked), so each program moves two contiguous
rows of heads*head_dim elements. Slots and block indices are int64, so pools past 2^31 elements
address correctly. Reference: vLLM's `reshape_and_cache` (the same contract, written in CUDA).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import cast
from ._common import (
    check_device,
    check_dtype,
    check_head_dim,
    index_tensor,
    interpreting,
    last_dim_contiguous,
    launch_device,
    next_pow2,
)


@triton.jit
def _write_kv_kernel(
    K, V,                                # [num_tokens, heads, head_dim]
    K_cache, V_cache,                    # [num_blocks, block_size, heads, head_dim]
    slot_mapping,                        # int64 [num_tokens]
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,  # cache strides: block, slot in block, head
    stride_vcb, stride_vcs, stride_vch,
    block_size,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    hd = offs_h.to(tl.int64)[:, None]
    t64 = t.to(tl.int64)

    k = tl.load(K + t64 * stride_kt + hd * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t64 * stride_vt + hd * stride_vh + offs_d[None, :], mask=mask)
    kc = K_cache + blk * stride_kcb + off * stride_kcs + hd * stride_kch + offs_d[None, :]
    vc = V_cache + blk * stride_vcb + off * stride_vcs + hd * stride_vch + offs_d[None, :]
    tl.store(kc, cast(k, K_cache.dtype.element_ty, INTERP_BF16), mask=mask)
    tl.store(vc, cast(v, V_cache.dtype.element_ty, INTERP_BF16), mask=mask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v `[num_tokens, heads, head_dim]` into the caches at `slot_mapping` (in place).

    Caches are `[num_blocks, block_size, heads, head_dim]` with a packed head_dim; slot_mapping is
    int64 `[num_tokens]`, slot = block * block_size + offset, negative slots are skipped. Slots are
    not bounds-checked on the device (that would need a sync); out-of-range slots are a caller bug.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k, v must share shape [num_tokens, heads, head_dim]; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches must be [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}]; "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [num_tokens]={k.shape[0]}, "
                         f"got {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t)
    check_head_dim(k.shape[2])
    check_device(k, v, k_cache, v_cache, slot_mapping)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must have a packed head_dim (stride 1); they are written in place")
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    # 2 warps: a GIT token is 12 heads x 64 = 768 elements per tensor; more threads would idle
    num_warps = 2 if num_heads * head_dim <= 1024 else 4
    with launch_device(k.device):
        _write_kv_kernel[(num_tokens,)](
            k, v, k_cache, v_cache, index_tensor(slot_mapping, torch.int64),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k_cache.shape[1],
            NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            BLOCK_H=next_pow2(num_heads), BLOCK_D=next_pow2(head_dim),
            INTERP_BF16=interpreting() and k.dtype != k_cache.dtype and k_cache.dtype == torch.bfloat16,
            num_warps=num_warps,
        )
