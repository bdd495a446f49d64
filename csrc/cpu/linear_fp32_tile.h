// One register tile of linear_fp32 (linear_fp32.cpp), written once for a vector type `Vec` (W floats)
// and compiled per ISA: linear_fp32.cpp includes this file (no include guard, on purpose) inside
// `namespace <isa>` inside the matching GITFAST_TARGET_BEGIN block, after defining Vec and GITFAST_TILE_ATTR
// (the entry's attributes: GCC's per-level clones for the portable path) there.
//
//   out[r * kCols + c] = sum_k x[r][k] * w[c][k]    r < R rows of x, c < kCols rows of the weight
//
// Both operands are read as stored (rows contiguous along k), so lane i of an accumulator sums the
// k = i (mod W) products and one horizontal sum per output ends the tile; k past the last whole
// vector is added in scalar.

// Rows per tile: R x kCols accumulators + R x vectors + one weight vector in registers (AVX2's 16
// hold 3 x 4 + 3 + 1; AVX-512's 32 hold 4 x 4 + 4 + 1 with room to spare).
constexpr int kRows = Vec::kRegs >= 32 ? 4 : 3;

// `pf`: P rows of the next weight tile to fetch from memory while this tile's rows of x are multiplied
// from cache. The caller spreads the next tile's rows over the passes of row tiles (one row per pass at
// 12 or more rows of x), so the memory system is kept busy through the whole tile instead of taking a
// burst of requests in its first pass, which stalled that pass (AMD Zen 3, 32 rows: the first pass, a
// tenth of the FMAs, took a quarter of the kernel's samples).
template <int R, int P>
GITFAST_INLINE void dot_tile(const float* const* x, const float* const* w, int64_t k, const float* const* pf,
                             float* out) {
  Vec acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = Vec::zero();
  const int64_t whole = k / Vec::W * Vec::W;
  for (int64_t i = 0; i < whole; i += Vec::W) {
    Vec xv[R];
    for (int r = 0; r < R; ++r) xv[r] = Vec::load(x[r] + i);
    for (int c = 0; c < P; ++c) prefetch<2>(pf[c] + i);  // into L2 (prefetcht1)
    for (int c = 0; c < kCols; ++c) {
      const Vec wv = Vec::load(w[c] + i);
      for (int r = 0; r < R; ++r) acc[r][c] = Vec::fma(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < kCols; ++c) {
      float s = acc[r][c].hsum();
      for (int64_t i = whole; i < k; ++i) s += x[r][i] * w[c][i];
      out[r * kCols + c] = s;
    }
  }
}

template <int R>
GITFAST_INLINE void dot_tile_rows(const float* const* x, const float* const* w, int64_t k, const float* const* pf,
                                  int npf, float* out) {
  switch (npf) {
    case 0: return dot_tile<R, 0>(x, w, k, pf, out);
    case 1: return dot_tile<R, 1>(x, w, k, pf, out);
    case 2: return dot_tile<R, 2>(x, w, k, pf, out);
    case 3: return dot_tile<R, 3>(x, w, k, pf, out);
    default: return dot_tile<R, kCols>(x, w, k, pf, out);
  }
}

// `rows` (1..kRows) rows of x against kCols weight rows, fetching `npf` (0..kCols) rows of the
// next tile (`pf`): the tile compiled for exactly that many rows, so a one-row decode step pays for one
// row of FMAs.
GITFAST_TILE_ATTR void tile(const float* const* x, int rows, const float* const* w, int64_t k, const float* const* pf,
                            int npf, float* out) {
  switch (rows) {
    case 1: return dot_tile_rows<1>(x, w, k, pf, npf, out);
    case 2: return dot_tile_rows<2>(x, w, k, pf, npf, out);
    case 3: return dot_tile_rows<3>(x, w, k, pf, npf, out);
    default: return dot_tile_rows<kRows>(x, w, k, pf, npf, out);
  }
}
