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
