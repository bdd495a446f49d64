"""Decode attention over the paged KV cache (one new token per sequence), with split-K.

Computes, for every sequence b and head h, with L = context_lens[b] cached tokens (the new one
included, already written to the cache),

    out[b, h] = softmax_j(scale * q[b, h] . K[b, j, h]) @ V[b, :, h],   j = 0 .. L-1,
    K[b, j] = k_cache[block_tables[b, j // block_size], j % block_size]

Decode tokens are text, so they see every cached token: no mask beyond the context length.

Layout: q `[batch, heads, head_dim]`; caches `[num_blocks, block_size, heads, head_dim]` (head_dim
packed); block_tables int32 `[batch, max_blocks_per_seq]`; context_lens int32 `[batch]`.

Design (flash-decoding): a single query row is memory-bound and too small for tensor cores, so each
program takes one (sequence, head, key split), gathers BLOCK_N cached tokens at a time through the
block table (any block_size; table entries and K/V past the context are never loaded, so stale or
NaN slots cannot leak), and keeps an fp32 online softmax with q.k as a broadcast multiply + row sum.
When batch * heads alone would leave the GPU's SMs idle, the keys are split across `num_splits`
programs that write partial (acc, max, sum) in fp32, and a second kernel merges them with the
log-sum-exp rule; otherwise a single pass writes the output directly. The split count is a runtime
argument (one compiled kernel serves every context length and batch) chosen from shapes only
(batch * heads and a host bound on the context, never context_lens values), so a call captured in
a CUDA graph stays valid. Each program divides its own sequence's key tiles evenly among the
splits, so a context far below the bound still spreads over all of them; splits left without a
tile write empty partials that the merge weighs by zero. A context of length 0 gives zeros.

References: Dao et al., "Flash-Decoding for long-context inference" (2023); vLLM's PagedAttention
(Kwon et al., 2023) for the block-table layout.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import cast, div, exp2
from ._common import (LOG2E, check_device, check_dtype, check_head_dim, check_paged_cache,
                      index_tensor, interpreting, launch_device, next_pow2)


# num_splits is not specialized (Triton would otherwise compile separate kernels for 1, for multiples
# of 16 and for the rest), so one compiled kernel serves every split count.
@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_kernel(
    Q,                                   # [batch, heads, head_dim]
    K_cache, V_cache,                    # [num_blocks, block_size, heads, head_dim]
    block_tables,                        # int32 [batch, max_blocks_per_seq]
    context_lens,                        # int32 [batch]
    Out,                                 # [batch, heads, head_dim] (written when num_splits == 1)
    Part_acc,                            # fp32 [batch * heads, num_splits, BLOCK_D] (when > 1)
    Part_ml,                             # fp32 [batch * heads, num_splits, 2]: running max, sum
    qk_scale,                            # sm_scale * log2(e)
    stride_qb, stride_qh,
    stride_kcb, stride_kcs, stride_kch,  # cache strides: block, slot in block, head
    stride_vcb, stride_vcs, stride_vch,
    stride_bt,                           # block_tables row stride
    stride_ob, stride_oh,
    num_heads,
    num_splits,                          # programs per (sequence, head) along grid axis 1
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, INTERP_BF16: tl.constexpr,
    PRECISE: tl.constexpr,               # fp32: IEEE division and a < 1 ulp exp2
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    ctx = tl.load(context_lens + b)
    # this sequence's key tiles shared evenly among the splits (counts differ by at most one)
    n_tiles = tl.cdiv(ctx, BLOCK_N)
    start = (split * n_tiles // num_splits) * BLOCK_N
    end = tl.minimum(((split + 1) * n_tiles // num_splits) * BLOCK_N, ctx)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_d,
                mask=d_ok, other=0.0).to(tl.float32)
    table = block_tables + b.to(tl.int64) * stride_bt
    k_head = K_cache + h.to(tl.int64) * stride_kch
    v_head = V_cache + h.to(tl.int64) * stride_vch

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        # -- gather BLOCK_N cached tokens through the block table --
        tok = t0 + offs_n
        tok_ok = tok < end
        blk = tl.load(table + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        k_rows = blk * stride_kcb + (tok % BLOCK_SIZE).to(tl.int64) * stride_kcs
        v_rows = blk * stride_vcb + (tok % BLOCK_SIZE).to(tl.int64) * stride_vcs
        mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        # -- scores (log2 domain) --
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
        s = tl.where(tok_ok, s, float("-inf"))
        # -- online softmax --
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = exp2(s - m_new, PRECISE)
        alpha = exp2(m_i - m_new, PRECISE)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new

    if num_splits == 1:
        # epilogue: an empty context (l_i = 0) gives zeros rather than 0/0
        out = div(acc, tl.where(l_i > 0, l_i, 1.0), PRECISE)
        tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d,
                 cast(out, Out.dtype.element_ty, INTERP_BF16), mask=d_ok)
    else:
        # epilogue: unnormalised partials; an empty split leaves (-inf, 0, 0), merged away later
        part = pid_bh.to(tl.int64) * num_splits + split
        tl.store(Part_acc + part * BLOCK_D + offs_d, acc)
        tl.store(Part_ml + part * 2, m_i)
        tl.store(Part_ml + part * 2 + 1, l_i)


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_merge_kernel(
    Part_acc, Part_ml,                   # from _paged_decode_kernel
    Out,                                 # [batch, heads, head_dim]
    stride_ob, stride_oh,
    num_heads,
    num_splits,                          # 2 .. BLOCK_S
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    part = pid_bh.to(tl.int64) * num_splits + offs_s
    m = tl.load(Part_ml + part * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(Part_ml + part * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(Part_acc + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None],
                  other=0.0)
    # -- log-sum-exp merge: rescale every split to the global max --
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)   # all splits empty: weights become 0
    w = exp2(m - m_max, PRECISE)
    l_sum = tl.sum(l * w, 0)
    out = div(tl.sum(acc * w[:, None], 0), tl.where(l_sum > 0, l_sum, 1.0), PRECISE)
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d,
             cast(out, Out.dtype.element_ty, INTERP_BF16), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Programs per SM worth launching before splitting keys stops paying: enough resident CTAs to keep
# ~16 KB of K/V loads in flight per CTA and hide DRAM latency.
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 32            # beyond this the merge pass and partial traffic outweigh the gain


def _plan(batch_heads: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """Number of key splits, from shapes and a host bound on the context only (graph-safe): enough
    programs to fill the device, at most one split per key tile of the longest possible context."""
    if device.type == "cuda":
        target = _PROGRAMS_PER_SM * _num_sms(device.index if device.index is not None
                                             else torch.cuda.current_device())
    else:
        target = 8  # interpreter: small, so tests exercise the split path on tiny shapes
    tiles = max(1, triton.cdiv(max_tokens, block_n))
    return min(_MAX_SPLITS, tiles, max(1, triton.cdiv(target, batch_heads)))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, sm_scale: Optional[float] = None, *,
    max_context_len: Optional[int] = None, num_splits: Optional[int] = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged cache -> `[batch, heads, head_dim]`.

    q `[batch, heads, head_dim]`; caches `[num_blocks, block_size, heads, head_dim]`; block_tables
    int32 `[batch, max_blocks_per_seq]`; context_lens int32 `[batch]` (cached tokens, the new one
    included). Optional, keyword only: max_context_len, a host-side upper bound on context_lens used
    to size the key splits (default: max_blocks_per_seq * block_size); num_splits to force a split
    count (1 = single pass, at most 32).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, heads, head_dim], got {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    check_paged_cache(q, k_cache, v_cache)
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError("block_tables must be [batch, max_blocks_per_seq], context_lens [batch]")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t)
    check_head_dim(head_dim)
    check_device(q, k_cache, v_cache, block_tables, context_lens)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must have a packed head_dim (stride 1)")
    if num_splits is not None and not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = index_tensor(block_tables, torch.int32)
    context_lens = index_tensor(context_lens, torch.int32)
    block_size = k_cache.shape[1]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)

    # 64 tokens x 64 dims x 2 bytes = 8 KB of K (and of V) per step: large enough to stream, small
    # enough for 4 warps to hold in registers; the interpreter takes 16 so tiny tests see many tiles.
    block_n = 16 if interpreting() else 64
    max_tokens = block_tables.shape[1] * block_size if max_context_len is None else max_context_len
    bh = batch * num_heads
    if num_splits is None:
        num_splits = _plan(bh, max_tokens, block_n, q.device)
    num_splits = int(num_splits)
    block_d = next_pow2(head_dim)
    if num_splits > 1:
        part_acc = torch.empty((bh, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((bh, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        # unused, but fp32 like the split path's, so both share one compiled kernel
        part_acc = part_ml = torch.empty(1, dtype=torch.float32, device=q.device)
    num_warps = 4 if block_d <= 64 else 8
    interp_bf16 = interpreting() and q.dtype == torch.bfloat16
    precise = q.dtype == torch.float32
    with launch_device(q.device):
        _paged_decode_kernel[(bh, num_splits)](
            q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml,
            sm_scale * LOG2E,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1),
            num_heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=block_size,
            INTERP_BF16=interp_bf16, PRECISE=precise, num_warps=num_warps,
        )
        if num_splits > 1:
            # BLOCK_S fixed at the largest split count: one compiled merge serves every count
            _paged_decode_merge_kernel[(bh,)](
                part_acc, part_ml, out, out.stride(0), out.stride(1), num_heads, num_splits,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=_MAX_SPLITS, INTERP_BF16=interp_bf16,
                PRECISE=precise,
                num_warps=1 if block_d <= 64 else 2,
            )
    return out
