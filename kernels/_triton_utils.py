"""Small @triton.jit helpers shared by the kernels, mostly workarounds for Triton's CPU interpreter.

Triton 3.9's interpreter (TRITON_INTERPRET=1) gets bf16 wrong in two ways: `tl.dot` on bf16
operands returns garbage, and fp32 -> bf16 casts truncate instead of rounding to nearest even. The
kernels pass `INTERP_BF16=True` only under the interpreter with bf16 data; on a GPU the flag is
False and these helpers compile to the plain `tl.dot` / `.to()`.
"""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        # bf16 x bf16 products are exact in fp32, so this matches the tensor-core result
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        # round fp32 to the nearest bf16 (ties to even) by hand, so the truncating cast is exact
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536   # -65536 == 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def softmax_tile(acc, l_i, m_i, q, kt, v, cols, row_limit, qk_scale,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One key tile of flash attention: scores in the log2 domain, the row mask (keys j < row_limit),
    and the online-softmax update of the running max `m_i`, sum `l_i` and output `acc`."""
    # -- scores --
    s = dot(q, kt, DOT_PRECISION, INTERP_BF16) * qk_scale
    if MASKED:
        s = tl.where(cols[None, :] < row_limit[:, None], s, float("-inf"))
    # -- online softmax --
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(cast(p, v.dtype, INTERP_BF16), v, DOT_PRECISION, INTERP_BF16)
    return acc, l_i, m_new


@triton.jit
def image_tokens(n_img_ptr, n_img_shared, b, limit, N_IMG_PER_SEQ: tl.constexpr):
    """Sequence b's image-token count (per-sequence array or one shared int), clamped to [0, limit]."""
    if N_IMG_PER_SEQ:
        n_img = tl.load(n_img_ptr + b)
    else:
        n_img = n_img_shared + 0 * limit  # as a tensor, like the per-sequence branch
    return tl.minimum(tl.maximum(n_img, 0), limit)
