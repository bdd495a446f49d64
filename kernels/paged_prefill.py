"""Prefill attention over the paged KV cache: new text tokens after an already cached prefix.

Used when several prompts (VQA questions, beams, sampled captions) share one image whose prefix K/V
is cached once. For sequence b with n = cu_seqlens_q[b+1] - cu_seqlens_q[b] new tokens and
L = context_lens[b] cached tokens (the n new ones already written at the END, positions L-n..L-1),
new token i sits at position p = L - n + i and computes

    out[i] = softmax_j(scale * q[i] . K[b, j]) @ V[b, :],   over j < max(P, p + 1)

with P = num_image_tokens[b] (clamped to [0, L]) and K/V gathered through block_tables as in
paged_decode. That is GIT's mask on the whole sequence: a text token sees every image token and the
text up to and including itself; with L = n it equals `git_attention` on the same tokens.

Layout: q packed `[total_q, heads, head_dim]`; caches `[num_blocks, block_size, heads, head_dim]`
(head_dim packed); block_tables int32 `[batch, max_blocks_per_seq]`; cu_seqlens_q int32
`[batch + 1]`; context_lens int32 `[batch]`; num_image_tokens int or int32 `[batch]`.

Design: the FlashAttention-2 loop of `attention.py` with gathered key/value tiles: one program per
(sequence, head, BLOCK_M new tokens) uses tensor-core dots on `[BLOCK_N, head_dim]` tiles whose
rows are fetched through the block table (any block_size), an fp32 online softmax, and the same
two-phase key range: unmasked up to the first row's limit, masked up to the last row's diagonal,
nothing beyond (cache slots past the context are never loaded, so stale data cannot leak). Prefix
lengths in GIT are ~200-900 tokens against ~20 new ones, so the work is one long unmasked sweep.

References: Dao, "FlashAttention-2" (2023); vLLM's prefix-caching prefill (`context_attention_fwd`).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ._triton_utils import cast, div, image_tokens, softmax_tile
from ._common import (
    LOG2E,
    check_device,
    check_dtype,
    check_head_dim,
    check_paged_cache,
    dot_precision,
    index_tensor,
    interpreting,
    last_dim_contiguous,
    launch_device,
    next_pow2,
    per_seq_image_tokens,
)


@triton.jit
def _paged_tiles(
    acc, l_i, m_i, q,
    k_head, v_head,            # cache pointers offset to this head
    table,                     # this sequence's block-table row
    stride_kcb, stride_kcs, stride_vcb, stride_vcs,
    offs_n, offs_d, row_limit, lo, hi, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    PRECISE: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        tok = start_n + offs_n
        # -- gather K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] through the block table --
        if MASKED:
            tok_ok = tok < hi
            blk = tl.load(table + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        else:
            tok_ok = tok >= 0  # all true: the whole tile lies inside the context
            blk = tl.load(table + tok // BLOCK_SIZE).to(tl.int64)
        in_blk = (tok % BLOCK_SIZE).to(tl.int64)
        k_ptrs = k_head + (blk * stride_kcb + in_blk * stride_kcs)[None, :] + offs_d[:, None]
        v_ptrs = v_head + (blk * stride_vcb + in_blk * stride_vcs)[:, None] + offs_d[None, :]
        kt = tl.load(k_ptrs, mask=tok_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
        acc, l_i, m_i = softmax_tile(acc, l_i, m_i, q, kt, v, tok, row_limit, qk_scale,
                                     MASKED, DOT_PRECISION, INTERP_BF16, PRECISE)
    return acc, l_i, m_i


@triton.jit
def _paged_prefill_kernel(
    Q, Out,                              # [total_q, heads, head_dim]
    K_cache, V_cache,                    # [num_blocks, block_size, heads, head_dim]
    block_tables,                        # int32 [batch, max_blocks_per_seq]
    cu_seqlens_q,                        # int32 [batch + 1]
    context_lens,                        # int32 [batch]
    n_img_ptr,                           # int32 [batch]; read only when N_IMG_PER_SEQ
    n_img_shared,                        # int: image tokens of every sequence otherwise
    qk_scale,                            # sm_scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch,  # cache strides: block, slot in block, head
    stride_vcb, stride_vcs, stride_vch,
    stride_bt,
    num_heads,
    N_IMG_PER_SEQ: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    PRECISE: tl.constexpr,              # fp32: IEEE division and a < 1 ulp exp2
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start = tl.load(cu_seqlens_q + b)
    n_q = tl.load(cu_seqlens_q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= n_q:
        return
    ctx = tl.load(context_lens + b)
    n_img = image_tokens(n_img_ptr, n_img_shared, b, ctx, N_IMG_PER_SEQ)
    first_pos = ctx - n_q                # position of new token 0

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt
              + h.to(tl.int64) * stride_qh + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    table = block_tables + b.to(tl.int64) * stride_bt
    k_head = K_cache + h.to(tl.int64) * stride_kch
    v_head = V_cache + h.to(tl.int64) * stride_vch

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- key ranges: the row at position p sees keys j < max(n_img, p + 1) --
    pos = first_pos + offs_m
    row_limit = tl.minimum(tl.maximum(pos + 1, n_img), ctx)
    full_end = (tl.minimum(tl.maximum(first_pos + start_m + 1, n_img), ctx) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(tl.minimum(first_pos + start_m + BLOCK_M, ctx), n_img)

    acc, l_i, m_i = _paged_tiles(acc, l_i, m_i, q, k_head, v_head, table,
                                 stride_kcb, stride_kcs, stride_vcb, stride_vcs,
                                 offs_n, offs_d, row_limit, 0, full_end, qk_scale,
                                 False, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, INTERP_BF16,
                                PRECISE)
    acc, l_i, m_i = _paged_tiles(acc, l_i, m_i, q, k_head, v_head, table,
                                 stride_kcb, stride_kcs, stride_vcb, stride_vcs,
                                 offs_n, offs_d, row_limit, full_end, hi, qk_scale,
                                 True, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, INTERP_BF16,
                                PRECISE)

    # epilogue: every valid row saw key 0 (context holds at least the new tokens), so l_i > 0
    out = div(acc, l_i[:, None], PRECISE)
    o_ptrs = (Out + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot
              + h.to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
    num_image_tokens: Union[int, torch.Tensor], sm_scale: Optional[float] = None, *,
    max_seqlen_q: Optional[int] = None,
) -> torch.Tensor:
    """GIT attention of new tokens over a paged cache that already holds them after a cached prefix.

    q `[total_q, heads, head_dim]`; caches `[num_blocks, block_size, heads, head_dim]`; block_tables
    int32 `[batch, max_blocks_per_seq]`; cu_seqlens_q int32 `[batch + 1]`; context_lens int32
    `[batch]` (>= each sequence's new-token count); num_image_tokens int or int32 `[batch]`.
    max_seqlen_q (keyword only): longest new-token run; pass it to avoid a device sync.
    Returns `[total_q, heads, head_dim]` in q's dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, heads, head_dim], got {tuple(q.shape)}")
    total_q, num_heads, head_dim = q.shape
    check_paged_cache(q, k_cache, v_cache)
    batch = cu_seqlens_q.numel() - 1
    if batch < 0 or block_tables.dim() != 2 or block_tables.shape[0] != batch \
            or context_lens.shape != (batch,):
        raise ValueError("need cu_seqlens_q [batch + 1], block_tables [batch, max_blocks_per_seq], "
                         "context_lens [batch]")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share a dtype; got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    check_head_dim(head_dim)
    check_device(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must have a packed head_dim (stride 1)")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cu_seqlens_q = index_tensor(cu_seqlens_q, torch.int32)
    context_lens = index_tensor(context_lens, torch.int32)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if batch else 0
    if total_q == 0 or batch == 0 or max_seqlen_q <= 0:
        return out
    q = last_dim_contiguous(q)
    n_img_t, n_img_shared = per_seq_image_tokens(num_image_tokens, batch, q.device)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    block_tables = index_tensor(block_tables, torch.int32)
    block_d = next_pow2(head_dim)
    if interpreting():
        block_m, block_n, num_warps, num_stages = 16, 16, 4, 1
    elif q.dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = 32, 32, 8, 2   # fp32 tiles: shared-memory bound
        if head_dim > 64:
            # the FMA dot holds 128-wide q rows and k columns per thread: 32 x 32 spilled 444 B on
            # sm_90; 32 x 16 unpipelined fits (74 registers, no spill; ptxas, Triton 3.9)
            block_n, num_stages = 16, 1
    else:
        # A GIT prompt is ~20 new tokens: one 32-row tile (not 128) per sequence and head avoids
        # computing 100 padded rows; 64-token key tiles over the long cached prefix.
        block_m = 32 if max_seqlen_q <= 32 else 64
        block_n, num_warps, num_stages = 64, 4, 3
        if block_m == 64 and head_dim > 64:
            num_warps = 8  # 64 rows x head_dim 80/128 spill registers with 4 warps (ptxas, sm_80)
    grid = (batch * num_heads, triton.cdiv(max_seqlen_q, block_m))
    with launch_device(q.device):
        _paged_prefill_kernel[grid](
            q, out, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
            n_img_t if n_img_t is not None else cu_seqlens_q, n_img_shared,
            sm_scale * LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), num_heads,
            N_IMG_PER_SEQ=n_img_t is not None, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=dot_precision(q.dtype),
            INTERP_BF16=interpreting() and q.dtype == torch.bfloat16,
            PRECISE=q.dtype == torch.float32,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out
