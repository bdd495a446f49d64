"""Small @triton.jit helpers shared by the kernels: interpreter workarounds and fp32-exact math.

Triton 3.9's interpreter (TRITON_INTERPRET=1) gets bf16 wrong in two ways: `tl.dot` on bf16
operands returns garbage, and fp32 -> bf16 casts truncate instead of rounding to nearest even. The
kernels pass `INTERP_BF16=True` only under the interpreter with bf16 data; on a GPU the flag is
False and these helpers compile to the plain `tl.dot` / `.to()`.

fp32 inputs take `PRECISE=True`: Triton lowers `tl.exp2` to `ex2.approx.ftz.f32` (2 ulp, subnormals
flushed) and `/` to `div.full.f32` (2 ulp), and its libdevice `exp2`/`exp` compile to the same
`ex2.approx.ftz` (Triton links libdevice with flush-to-zero on), so no precise exp2 is reachable from
Triton's language (3.6-3.9). `exp2` below computes it in software instead (< 1 ulp, subnormals kept)
and `div` uses IEEE `div.rn`; half precision keeps the fast hardware forms.
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
def _exp2_fp32(x):
    """2^x in fp32 to < 1 ulp (0.94 with fma; the interpreter rounds a*b+c twice: 1.13): 2^x = 2^n * 2^f with n = round(x), f = x - n in [-1/2, 1/2] (exact),
    2^f by a degree-6 fit (relative error 1.6e-8), and 2^n applied in two exact power-of-two factors
    so that subnormal results are rounded once. -inf -> 0, NaN -> NaN."""
    xc = tl.minimum(tl.maximum(x, -152.0), 129.0)         # beyond: 0 or inf either way
    n = tl.floor(xc + 0.5)
    f = xc - n
    # Horner with explicit fma: one rounding a step, whatever Triton's default fp-fusion setting
    p = tl.fma(f, 0.00015345810970757157, 0.0013399930903688073)
    p = tl.fma(p, f, 0.009618489071726799)
    p = tl.fma(p, f, 0.05550328642129898)
    p = tl.fma(p, f, 0.24022646248340607)
    p = tl.fma(p, f, 0.6931471824645996)                  # ~ ln(2)
    p = tl.fma(p, f, 1.0)
    ni = n.to(tl.int32)
    n1 = ni >> 1                                          # n1 + n2 = n, both in [-76, 65]
    n2 = ni - n1
    s1 = ((n1 + 127) << 23).to(tl.float32, bitcast=True)  # 2^n1 built from its exponent bits
    s2 = ((n2 + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, (p * s1) * s2)


@triton.jit
def exp2(x, PRECISE: tl.constexpr):
    if PRECISE:
        return _exp2_fp32(x)
    else:
        return tl.exp2(x)


@triton.jit
def div(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def softmax_tile(acc, l_i, m_i, q, kt, v, cols, row_limit, qk_scale,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
                 PRECISE: tl.constexpr):
    """One key tile of flash attention: scores in the log2 domain, the row mask (keys j < row_limit),
    and the online-softmax update of the running max `m_i`, sum `l_i` and output `acc`."""
    # -- scores --
    s = dot(q, kt, DOT_PRECISION, INTERP_BF16) * qk_scale
    if MASKED:
        s = tl.where(cols[None, :] < row_limit[:, None], s, float("-inf"))
    # -- online softmax --
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = exp2(s - m_new[:, None], PRECISE)
    alpha = exp2(m_i - m_new, PRECISE)
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
