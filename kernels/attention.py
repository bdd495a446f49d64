"""Varlen flash attention with GIT's prefix-LM mask (decoder prefill and vision encoder).

Computes, for every packed sequence b and head h,

    out[i] = softmax_j(scale * q[i] . k[j]  over allowed j) @ v

where, with P = num_image_tokens[b] (clamped to [0, seqlen]), key j is allowed for query i iff

    j < max(P, i + 1)

i.e. the first P tokens (image) form a bidirectional block that sees only itself, and every later
(text) token sees the whole image block plus text up to and including itself. P = seqlen is plain
bidirectional attention (the vision encoder), P = 0 plain causal attention.

Layout: q, k, v, out are packed varlen `[total_tokens, heads, head_dim]` (any token/head strides,
head_dim packed); `cu_seqlens` int32 `[batch + 1]` holds the sequence starts.

Design (FlashAttention-2): one program per (sequence, head, BLOCK_M query rows); it streams
key/value tiles with an online softmax in fp32, so no score matrix is ever stored. Per query tile
the key range is split in two: tiles every row may see completely run without a mask; the rest (the
image boundary and the diagonal) run masked; tiles no row may see are never visited (image query
tiles stop at the image block, text query tiles at the diagonal). Row indices are widened to int64 before they meet a
stride, so tensors past 2^31 elements address correctly.

References: Dao, "FlashAttention-2" (2023); the Triton fused-attention tutorial; GIT's mask in
transformers' `modeling_git.py` (`create_attention_mask`).
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
    dot_precision,
    index_tensor,
    interpreting,
    last_dim_contiguous,
    launch_device,
    next_pow2,
    per_seq_image_tokens,
)


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q,
    k_base, v_base,            # pointers to key/value row 0 of this (sequence, head)
    stride_kt, stride_vt,      # token strides of k and v
    offs_m, offs_n, offs_d,
    row_limit,                 # [BLOCK_M] int32: keys j < row_limit are allowed for each row
    lo, hi, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    PRECISE: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = k_base + cols.to(tl.int64)[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :]
        # -- load K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] --
        if MASKED:
            col_ok = cols < hi
            if EVEN_D:
                kt = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
            else:
                d_ok = offs_d < HEAD_DIM
                kt = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                kt = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                d_ok = offs_d < HEAD_DIM
                kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc, l_i, m_i = softmax_tile(acc, l_i, m_i, q, kt, v, cols, row_limit, qk_scale,
                                     MASKED, DOT_PRECISION, INTERP_BF16, PRECISE)
    return acc, l_i, m_i


@triton.jit
def _git_attention_kernel(
    Q, K, V, Out,                        # [total_tokens, heads, head_dim]
    cu_seqlens,                          # int32 [batch + 1]
    n_img_ptr,                           # int32 [batch]; read only when N_IMG_PER_SEQ
    n_img_shared,                        # int: image tokens of every sequence otherwise
    qk_scale,                            # sm_scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads,
    SEQ_BUCKET,                          # next_pow2(max_seqlen): autotune key only
    N_IMG_PER_SEQ: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    PRECISE: tl.constexpr,              # fp32: IEEE division and a < 1 ulp exp2
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start = tl.load(cu_seqlens + b)
    seqlen = tl.load(cu_seqlens + b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    n_img = image_tokens(n_img_ptr, n_img_shared, b, seqlen, N_IMG_PER_SEQ)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    row_ok = offs_m < seqlen
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + (seq_start + offs_m).to(tl.int64)[:, None] * stride_qt
              + h.to(tl.int64) * stride_qh + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + seq_start.to(tl.int64) * stride_kt + h.to(tl.int64) * stride_kh
    v_base = V + seq_start.to(tl.int64) * stride_vt + h.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- key ranges: row i may see keys j < max(n_img, i + 1) --
    # Every row of the tile sees [0, full_end) whole; [full_end, hi) needs the mask; keys >= hi are
    # seen by no row (image tiles end at n_img, text tiles at their diagonal) and are skipped.
    row_limit = tl.minimum(tl.maximum(offs_m + 1, n_img), seqlen)
    full_end = (tl.minimum(tl.maximum(start_m + 1, n_img), seqlen) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(tl.minimum(start_m + BLOCK_M, seqlen), n_img)

    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                offs_m, offs_n, offs_d, row_limit, 0, full_end, qk_scale,
                                False, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PRECISION, INTERP_BF16,
                                PRECISE)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                offs_m, offs_n, offs_d, row_limit, full_end, hi, qk_scale,
                                True, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PRECISION, INTERP_BF16,
                                PRECISE)

    # epilogue: every valid row saw key 0, so l_i > 0
    out = div(acc, l_i[:, None], PRECISE)
    o_ptrs = (Out + (seq_start + offs_m).to(tl.int64)[:, None] * stride_ot
              + h.to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & d_ok[None, :])


def _gpu_configs():
    # Kept small: autotuning runs once per (head_dim, sequence-length bucket, dtype). None of these
    # spills on sm_90 (ptxas log, Triton 3.9; tests/test_kernels_compile.py checks it on every run):
    # at head_dim 64 fp16, 127 / 128 / 88 registers. 64-row tiles halve the padding of GIT's
    # ~217-token sequences (217 -> 256 rows instead of 256 or 384).
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        # fp32 (no tensor-core fast path): smaller tiles keep the staged K/V within shared memory;
        # 8 warps, because with 4 the fp32 accumulators spill (255 registers + 1.3 KB on sm_90)
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
        # fp32 at head_dim > 64: the FMA dot q.k^T holds a whole 128-wide row of q and column of
        # k per thread, so 64 x 32 tiles spill 1.3 KB on sm_90 (112 B on sm_80) whatever the warps;
        # 32 x 16 tiles, unpipelined, fit: 77-86 registers, no spill (ptxas, Triton 3.9)
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=1),
    ]


def _prune(configs, named_args, **kwargs):
    # constexprs arrive in kwargs, positional tensors in named_args
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    def is_fp32_config(c):
        return c.num_stages < 3

    if named_args["Q"].dtype == torch.float32:
        block_n = 32 if head_dim <= 64 else 16
        return [c for c in configs if is_fp32_config(c) and c.kwargs["BLOCK_N"] == block_n]
    configs = [c for c in configs if not is_fp32_config(c)]
    if head_dim <= 64:
        return configs
    # head_dim > 64: 128-row tiles need 8 warps to keep the accumulator in registers, and 64 x 64
    # tiles on 4 warps spill on sm_80 (ptxas: 56-172 B, by Triton version); 64 x 32 tiles fit.
    return [c for c in configs if c.num_warps == 8 or c.kwargs["BLOCK_N"] == 32]


_git_attention_tuned = triton.autotune(
    configs=_gpu_configs(), key=["HEAD_DIM", "SEQ_BUCKET", "N_IMG_PER_SEQ"],
    prune_configs_by={"early_config_prune": _prune},
)(_git_attention_kernel)

# Under the interpreter, small tiles so that tiny test sequences still span several tiles.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def git_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_image_tokens: Union[int, torch.Tensor],
    max_seqlen: Optional[int] = None,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """GIT prefix-LM attention over packed sequences; returns out `[total_tokens, heads, head_dim]`.

    q, k, v: `[total_tokens, heads, head_dim]` (fp16/bf16/fp32, same dtype); cu_seqlens: int32
    `[batch + 1]`; num_image_tokens: int shared by all sequences or int32 tensor `[batch]` (clamped
    to each sequence's length); max_seqlen: longest sequence (pass it to avoid a device sync);
    sm_scale: defaults to 1/sqrt(head_dim).
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share shape [total_tokens, heads, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_dtype("q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    total, num_heads, head_dim = q.shape
    check_head_dim(head_dim)
    check_device(q, k, v, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [batch + 1]")
    batch = cu_seqlens.numel() - 1
    cu_seqlens = index_tensor(cu_seqlens, torch.int32)
    n_img_t, n_img_shared = per_seq_image_tokens(num_image_tokens, batch, q.device)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if batch else 0
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total == 0 or batch == 0 or max_seqlen <= 0:
        return out

    args = (
        q, k, v, out, cu_seqlens, n_img_t if n_img_t is not None else cu_seqlens, n_img_shared,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        num_heads, next_pow2(max_seqlen),
    )
    meta = dict(N_IMG_PER_SEQ=n_img_t is not None, HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
                DOT_PRECISION=dot_precision(q.dtype),
                INTERP_BF16=interpreting() and q.dtype == torch.bfloat16,
                PRECISE=q.dtype == torch.float32)
    with launch_device(q.device):
        if interpreting():
            grid = (batch * num_heads, triton.cdiv(max_seqlen, _INTERPRET_CONFIG["BLOCK_M"]))
            _git_attention_kernel[grid](*args, **meta, **_INTERPRET_CONFIG)
        else:
            def grid(m):
                return (batch * num_heads, triton.cdiv(max_seqlen, m["BLOCK_M"]))
            _git_attention_tuned[grid](*args, **meta)
    return out
