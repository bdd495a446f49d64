// The register tile of int8_mm_vnni (int8_gemm_vnni.cpp), written once for a vector type `Vec` and
// compiled per ISA: int8_gemm_vnni.cpp includes this file (no include guard, on purpose) inside each
// path's namespace inside its GITFAST_TARGET_BEGIN block, after defining Vec there, so every function
// below is compiled for that ISA and the vector type's operations inline into it.
//
// Vec: kLanes int32 lanes (output columns) per vector, kRows rows per tile; Acc / U / W its
// accumulator, broadcast row quad and weight vector types; zero(), row(quad), weights(p),
// dot(acc, u, w) (acc += 4 products per lane), store(out, acc, corr) (out = acc - corr).

// R rows x NV vectors of columns over `quads` k-quads: u rows `a` (whole quads, zero-padded), `w[v]`
// vector v's packed weights (advancing kQuadBytes per quad), out = acc - corr per column.
template <int R, int NV>
GITFAST_INLINE void tile(const uint8_t* const* a, const int8_t* const* w, int64_t quads, const int32_t* corr,
                         int32_t* out, int64_t ldo) {
  typename Vec::Acc acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
  for (int64_t j = 0; j < quads; ++j) {
    typename Vec::W wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Vec::weights(w[v] + j * kQuadBytes);
    for (int r = 0; r < R; ++r) {
      const typename Vec::U u = Vec::row(quad_at(a[r] + j * kQuad));
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::dot(acc[r][v], u, wv[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) Vec::store(out + r * ldo + v * Vec::kLanes, acc[r][v], corr + v * Vec::kLanes);
}

template <int R>
GITFAST_INLINE void tile_cols(const uint8_t* const* a, const int8_t* const* w, int nv, int64_t quads,
                              const int32_t* corr, int32_t* out, int64_t ldo) {
  if (nv == 2) return tile<R, 2>(a, w, quads, corr, out, ldo);
  return tile<R, 1>(a, w, quads, corr, out, ldo);
}

// `rows` (1..Vec::kRows) rows and `nv` (1..2) vectors: the tile compiled for exactly that many, so the
// last rows of a call pay for their own rows only.
void tile_entry(const uint8_t* const* a, int rows, const int8_t* const* w, int nv, int64_t quads,
                const int32_t* corr, int32_t* out, int64_t ldo) {
  static_assert(Vec::kRows <= kMaxRows && 2 * Vec::kLanes <= kMaxCols, "tile larger than the caller's buffers");
  constexpr int R = Vec::kRows;
  switch (rows) {
    case 1: return tile_cols<1>(a, w, nv, quads, corr, out, ldo);
    case 2: return tile_cols<2>(a, w, nv, quads, corr, out, ldo);
    case 3: return tile_cols<3>(a, w, nv, quads, corr, out, ldo);
    case 4: return tile_cols<(R < 4 ? R : 4)>(a, w, nv, quads, corr, out, ldo);
    case 5: return tile_cols<(R < 5 ? R : 5)>(a, w, nv, quads, corr, out, ldo);
    case 6: return tile_cols<(R < 6 ? R : 6)>(a, w, nv, quads, corr, out, ldo);
    case 7: return tile_cols<(R < 7 ? R : 7)>(a, w, nv, quads, corr, out, ldo);
    default: return tile_cols<R>(a, w, nv, quads, corr, out, ldo);
  }
}
