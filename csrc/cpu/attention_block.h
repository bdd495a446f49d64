// One query block of GIT attention on packed fp32 operands, written once for a vector type `Vec`
// (W floats) and compiled per ISA: attention.cpp includes this file (no include guard, on purpose)
// inside `namespace <isa>` inside the matching GITFAST_TARGET_BEGIN block, after defining Vec there.
//
// Operands (built by attention.cpp's packing, zero-padded so no loop needs a tail):
//   Kt  [Dp][Lp]  keys transposed: column j is key j; Lp a multiple of kTile
//   V   [Lp][Dp]  values
//   Q   [kRows][Dp] queries pre-scaled by sm_scale * log2(e): scores come out in base 2
//   lim [nr]      row r sees keys j < lim[r] (1 <= lim[r] <= L)
// Output O [nr][Dp] = softmax(Q Kt) V per row, in fp32. Online softmax over key tiles of kTile.

// Rows per block: score accumulators (kRows x kTile/W) and the output rows (kRows x NV) stay in
// registers with AVX-512's 32; AVX2's 16 registers take half the rows.
constexpr int kRows = Vec::kRegs >= 32 ? 4 : 2;
constexpr int kTV = kTile / Vec::W;  // vectors per key tile

// NV: vectors per head row (Dp / W) when known at compile time, 0 for a runtime count `nv`.
// R: rows computed (kRows, or 1 for a decode step's single query, which would otherwise pay for
// kRows rows of FMAs).
template <int NV, int R>
GITFAST_INLINE void attend_block_nv(const float* Kt, const float* V, const float* Q, const int* lim, int nr,
                                          int64_t Lp, int nv_runtime, float* O) {
  constexpr int kMaxNV = NV > 0 ? NV : kMaxHeadDim / Vec::W;
  const int nv = NV > 0 ? NV : nv_runtime;
  const int64_t Dp = static_cast<int64_t>(nv) * Vec::W;
  Vec o[R][kMaxNV];
  float m[R], l[R];
  alignas(64) float p[R][kTile];
  int max_lim = 0;
  for (int r = 0; r < R; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.0f;
    for (int v = 0; v < nv; ++v) o[r][v] = Vec::zero();
    if (r < nr) max_lim = std::max(max_lim, lim[r]);
  }
  for (int64_t j0 = 0; j0 < max_lim; j0 += kTile) {
    // -- scores: s[r] = Q[r] . Kt[:, j0 : j0 + kTile], FMA over the head dim --
    Vec s[R][kTV];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < kTV; ++t) s[r][t] = Vec::zero();
    const float* kcol = Kt + j0;
    for (int64_t d = 0; d < Dp; ++d, kcol += Lp) {
      Vec k[kTV];
      for (int t = 0; t < kTV; ++t) k[t] = Vec::load(kcol + t * Vec::W);
      for (int r = 0; r < R; ++r) {
        const Vec q = Vec::broadcast(Q[r * Dp + d]);
        for (int t = 0; t < kTV; ++t) s[r][t] = Vec::fma(q, k[t], s[r][t]);
      }
    }
    // -- online softmax: mask keys past each row's limit, rescale the running sums --
    for (int r = 0; r < R; ++r) {
      const int valid = r < nr ? static_cast<int>(std::min<int64_t>(lim[r] - j0, kTile)) : 0;
      if (valid <= 0) {  // nothing visible to this row in the tile (or a padding row)
        for (int t = 0; t < kTV; ++t) Vec::zero().store(p[r] + t * Vec::W);
        continue;
      }
      Vec mx = Vec::broadcast(-std::numeric_limits<float>::infinity());
      for (int t = 0; t < kTV; ++t) {
        s[r][t] = Vec::mask_from(s[r][t], valid - t * Vec::W);
        mx = Vec::max(mx, s[r][t]);
      }
      const float m_new = std::max(m[r], mx.hmax());
      const float alpha = std::exp2(m[r] - m_new);  // 0 on the first tile (m = -inf)
      m[r] = m_new;
      const Vec mv = Vec::broadcast(m_new);
      Vec sum = Vec::zero();
      for (int t = 0; t < kTV; ++t) {
        const Vec e = Vec::exp2(Vec::sub(s[r][t], mv));
        sum = Vec::add(sum, e);
        e.store(p[r] + t * Vec::W);
      }
      l[r] = l[r] * alpha + sum.hsum();
      if (alpha != 1.0f) {
        const Vec a = Vec::broadcast(alpha);
        for (int v = 0; v < nv; ++v) o[r][v] = Vec::mul(o[r][v], a);
      }
    }
    // -- o += p V over the tile's keys --
    const int64_t keys = std::min<int64_t>(kTile, max_lim - j0);
    const float* vrow = V + j0 * Dp;
    for (int64_t t = 0; t < keys; ++t, vrow += Dp) {
      for (int v = 0; v < nv; ++v) {
        const Vec vv = Vec::load(vrow + v * Vec::W);
        for (int r = 0; r < R; ++r) o[r][v] = Vec::fma(Vec::broadcast(p[r][t]), vv, o[r][v]);
      }
    }
  }
  // epilogue: normalise (every row saw at least key 0, so l > 0)
  for (int r = 0; r < nr; ++r) {
    const Vec inv = Vec::broadcast(1.0f / l[r]);
    for (int v = 0; v < nv; ++v) Vec::mul(o[r][v], inv).store(O + r * Dp + v * Vec::W);
  }
}

// Dispatches to a compile-time vector count for the common head dims (registers), else runtime, and
// to one row when the block holds one query.
template <int R>
void attend_block_rows(const float* Kt, const float* V, const float* Q, const int* lim, int nr, int64_t Lp, int nv,
                       float* O) {
  switch (nv) {
    case 1: return attend_block_nv<1, R>(Kt, V, Q, lim, nr, Lp, nv, O);
    case 2: return attend_block_nv<2, R>(Kt, V, Q, lim, nr, Lp, nv, O);
    case 4: return attend_block_nv<4, R>(Kt, V, Q, lim, nr, Lp, nv, O);
    case 5: return attend_block_nv<5, R>(Kt, V, Q, lim, nr, Lp, nv, O);
    case 8: return attend_block_nv<8, R>(Kt, V, Q, lim, nr, Lp, nv, O);
    default: return attend_block_nv<0, R>(Kt, V, Q, lim, nr, Lp, nv, O);
  }
}

void attend_block(const float* Kt, const float* V, const float* Q, const int* lim, int nr, int64_t Lp, int nv,
                  float* O) {
  if (nr == 1) return attend_block_rows<1>(Kt, V, Q, lim, nr, Lp, nv, O);
  attend_block_rows<kRows>(Kt, V, Q, lim, nr, Lp, nv, O);
}

// ---- every query sees every key (the vision encoder, image prefixes) ----------------------------
// Rows of one block see all L keys, so the block takes its whole score rows at once, S [kFullRows][Lp],
// an exact softmax per row (max, then 2^(s - max), then the sum: no running rescale of o as the tiled
// kernel above needs), then O = P V. Both products are register tiles of kFullRows rows x 2 vectors
// (AVX2: 12 accumulators; the tiled kernel's o alone fills AVX2's 16 registers at head dim 64). The
// operands are packed in panels of 2 W columns, so every tile reads one contiguous run (L1/L2-resident:
// 50 KB each for 197 keys x 64 dims):
//   Kp [Lp / 2W][Dp][2W]  keys: panel p holds keys p*2W .. p*2W + 2W - 1, d-major (zero past L)
//   Vp [Dp / 2W][L][2W]   values: panel c holds dims c*2W .. (a last panel of W when 2W does not divide Dp)
constexpr int kFullRows = Vec::kRegs >= 32 ? 8 : 6;
constexpr int kPanel = 2 * Vec::W;

// S[r][j] = Q[r] . K[j] for every j < Lp (Lp a multiple of kPanel)
GITFAST_INLINE void full_scores(const float* Kp, const float* Q, int64_t Dp, int64_t Lp, float* S) {
  for (int64_t j = 0; j < Lp; j += kPanel) {
    Vec s[kFullRows][2];
    for (int r = 0; r < kFullRows; ++r) s[r][0] = s[r][1] = Vec::zero();
    const float* kc = Kp + j * Dp;  // panel j / kPanel
    for (int64_t d = 0; d < Dp; ++d, kc += kPanel) {
      const Vec k0 = Vec::load(kc), k1 = Vec::load(kc + Vec::W);
      for (int r = 0; r < kFullRows; ++r) {
        const Vec q = Vec::broadcast(Q[r * Dp + d]);
        s[r][0] = Vec::fma(q, k0, s[r][0]);
        s[r][1] = Vec::fma(q, k1, s[r][1]);
      }
    }
    for (int r = 0; r < kFullRows; ++r) {
      s[r][0].store(S + r * Lp + j);
      s[r][1].store(S + r * Lp + j + Vec::W);
    }
  }
}

// S[r] <- 2^(S[r] - max) over keys j < L (0 past L); returns 1 / the row's sum
GITFAST_INLINE float full_softmax_row(float* S, int64_t L, int64_t Lp) {
  Vec mx = Vec::broadcast(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < Lp; j += Vec::W) {
    const Vec s = Vec::mask_from(Vec::load(S + j), static_cast<int>(std::min<int64_t>(L - j, Vec::W)));
    s.store(S + j);
    mx = Vec::max(mx, s);
  }
  const Vec m = Vec::broadcast(mx.hmax());
  Vec sum = Vec::zero();
  for (int64_t j = 0; j < Lp; j += Vec::W) {
    const Vec e = Vec::exp2(Vec::sub(Vec::load(S + j), m));
    sum = Vec::add(sum, e);
    e.store(S + j);
  }
  return 1.0f / sum.hsum();  // the largest score gives 2^0 = 1: sum >= 1
}

// O[r][c : c + C W] = inv[r] * sum_{j < L} P[r][j] V[j][c : ...] from the panel at `panel` (C W wide)
template <int C>
GITFAST_INLINE void full_values_cols(const float* panel, const float* P, int64_t L, int64_t Lp, int64_t Dp,
                                     const float* inv, int64_t c, float* O) {
  Vec o[kFullRows][C];
  for (int r = 0; r < kFullRows; ++r)
    for (int v = 0; v < C; ++v) o[r][v] = Vec::zero();
  const float* vr = panel;
  for (int64_t j = 0; j < L; ++j, vr += C * Vec::W) {
    Vec vv[C];
    for (int v = 0; v < C; ++v) vv[v] = Vec::load(vr + v * Vec::W);
    for (int r = 0; r < kFullRows; ++r) {
      const Vec p = Vec::broadcast(P[r * Lp + j]);
      for (int v = 0; v < C; ++v) o[r][v] = Vec::fma(p, vv[v], o[r][v]);
    }
  }
  for (int r = 0; r < kFullRows; ++r) {
    const Vec scale = Vec::broadcast(inv[r]);
    for (int v = 0; v < C; ++v) Vec::mul(o[r][v], scale).store(O + r * Dp + c + v * Vec::W);
  }
}

// One block of kFullRows query rows (Q zero-padded past the block's real rows, whose outputs are
// then ignored) over all L keys; S [kFullRows][Lp] scratch; O [kFullRows][Dp].
void attend_full(const float* Kp, const float* Vp, const float* Q, int64_t L, int64_t Lp, int64_t Dp, float* S,
                 float* O) {
  full_scores(Kp, Q, Dp, Lp, S);
  float inv[kFullRows];
  for (int r = 0; r < kFullRows; ++r) inv[r] = full_softmax_row(S + r * Lp, L, Lp);
  int64_t c = 0;
  for (; c + kPanel <= Dp; c += kPanel) full_values_cols<2>(Vp + c * L, S, L, Lp, Dp, inv, c, O);
  for (; c < Dp; c += Vec::W) full_values_cols<1>(Vp + c * L, S, L, Lp, Dp, inv, c, O);
}

// One query over L keys (a decode step): a dot product per key, the softmax a pass over S, then
// o = sum_j p_j V[j]: no score tile or row block to fill for one row. K[j] and V[j] point at row j
// (fp32, or bf16 bits widened exactly in registers by Vec::load; where the rows lie in the cache, or
// packed into scratch), nv * W values each; q [nv * W] pre-scaled as above; S [>= L rounded up to W]
// scratch for the scores.
template <int NV, typename T>
GITFAST_INLINE void attend_rows_nv(const T* const* K, const T* const* V, const float* q, int64_t L, int nv_runtime,
                                   float* S, float* O) {
  constexpr int kMaxNV = NV > 0 ? NV : kMaxHeadDim / Vec::W;
  const int nv = NV > 0 ? NV : nv_runtime;
  Vec qv[kMaxNV];
  for (int v = 0; v < nv; ++v) qv[v] = Vec::load(q + v * Vec::W);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    const T* k = K[j];
    Vec acc = Vec::mul(qv[0], Vec::load(k));
    for (int v = 1; v < nv; ++v) acc = Vec::fma(qv[v], Vec::load(k + v * Vec::W), acc);
    S[j] = acc.hsum();
    m = std::max(m, S[j]);
  }
  const int64_t Lw = (L + Vec::W - 1) / Vec::W * Vec::W;
  for (int64_t j = L; j < Lw; ++j) S[j] = -std::numeric_limits<float>::infinity();  // exp2 -> 0
  const Vec mv = Vec::broadcast(m);
  Vec sum = Vec::zero();
  for (int64_t j = 0; j < Lw; j += Vec::W) {
    const Vec e = Vec::exp2(Vec::sub(Vec::load(S + j), mv));
    sum = Vec::add(sum, e);
    e.store(S + j);
  }
  Vec o[kMaxNV];
  for (int v = 0; v < nv; ++v) o[v] = Vec::zero();
  for (int64_t j = 0; j < L; ++j) {
    const Vec p = Vec::broadcast(S[j]);
    const T* vr = V[j];
    for (int v = 0; v < nv; ++v) o[v] = Vec::fma(p, Vec::load(vr + v * Vec::W), o[v]);
  }
  const Vec inv = Vec::broadcast(1.0f / sum.hsum());  // key 0 is always visible: sum >= 1
  for (int v = 0; v < nv; ++v) Vec::mul(o[v], inv).store(O + v * Vec::W);
}

// One decode query per head for `nh` heads of one sequence at once, token-major: K[j] and V[j] point at
// token j's row of the first head, the others follow every `hs` elements, so one pass over a cache
// block's rows streams them (heads adjacent: one run of nh * D values per token) where a pass per head
// reads a 256-byte piece every few KB (AMD Zen 3, git-base, 32 sequences: see bench/RESULTS.md). Per
// head, the arithmetic and its order are attend_rows_nv's, so the outputs are bitwise the same:
// q [nh][qs] pre-scaled; S [nh][ls] scores (ls >= L rounded up to W); M [nh] running maxima;
// O [nh][qs] the outputs, accumulated in place token by token.
template <int NV, typename T>
GITFAST_INLINE void attend_heads_nv(const T* const* K, const T* const* V, int64_t hs, int nh, const float* q,
                                    int64_t qs, int64_t L, int nv_runtime, float* S, int64_t ls, float* M, float* O) {
  const int nv = NV > 0 ? NV : nv_runtime;
  for (int h = 0; h < nh; ++h) M[h] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    for (int h = 0; h < nh; ++h) {
      const T* k = K[j] + h * hs;
      const float* qh = q + h * qs;
      Vec acc = Vec::mul(Vec::load(qh), Vec::load(k));
      for (int v = 1; v < nv; ++v) acc = Vec::fma(Vec::load(qh + v * Vec::W), Vec::load(k + v * Vec::W), acc);
      const float s = acc.hsum();
      S[h * ls + j] = s;
      M[h] = std::max(M[h], s);
    }
  }
  const int64_t Lw = (L + Vec::W - 1) / Vec::W * Vec::W;
  for (int h = 0; h < nh; ++h) {
    float* Sh = S + h * ls;
    for (int64_t j = L; j < Lw; ++j) Sh[j] = -std::numeric_limits<float>::infinity();  // exp2 -> 0
    const Vec mv = Vec::broadcast(M[h]);
    Vec sum = Vec::zero();
    for (int64_t j = 0; j < Lw; j += Vec::W) {
      const Vec e = Vec::exp2(Vec::sub(Vec::load(Sh + j), mv));
      sum = Vec::add(sum, e);
      e.store(Sh + j);
    }
    M[h] = 1.0f / sum.hsum();  // now the normaliser; key 0 is always visible: sum >= 1
    for (int v = 0; v < nv; ++v) Vec::zero().store(O + h * qs + v * Vec::W);
  }
  for (int64_t j = 0; j < L; ++j) {
    for (int h = 0; h < nh; ++h) {
      const Vec p = Vec::broadcast(S[h * ls + j]);
      const T* vr = V[j] + h * hs;
      float* oh = O + h * qs;
      for (int v = 0; v < nv; ++v) {
        Vec::fma(p, Vec::load(vr + v * Vec::W), Vec::load(oh + v * Vec::W)).store(oh + v * Vec::W);
      }
    }
  }
  for (int h = 0; h < nh; ++h) {
    const Vec inv = Vec::broadcast(M[h]);
    for (int v = 0; v < nv; ++v) Vec::mul(Vec::load(O + h * qs + v * Vec::W), inv).store(O + h * qs + v * Vec::W);
  }
}

template <typename T>
void attend_heads(const T* const* K, const T* const* V, int64_t hs, int nh, const float* q, int64_t qs, int64_t L,
                  int nv, float* S, int64_t ls, float* M, float* O) {
  switch (nv) {
    case 4: return attend_heads_nv<4>(K, V, hs, nh, q, qs, L, nv, S, ls, M, O);
    case 8: return attend_heads_nv<8>(K, V, hs, nh, q, qs, L, nv, S, ls, M, O);
    default: return attend_heads_nv<0>(K, V, hs, nh, q, qs, L, nv, S, ls, M, O);
  }
}

void attend_heads_f32(const float* const* K, const float* const* V, int64_t hs, int nh, const float* q, int64_t qs,
                      int64_t L, int nv, float* S, int64_t ls, float* M, float* O) {
  attend_heads<float>(K, V, hs, nh, q, qs, L, nv, S, ls, M, O);
}

void attend_heads_bf16(const uint16_t* const* K, const uint16_t* const* V, int64_t hs, int nh, const float* q,
                       int64_t qs, int64_t L, int nv, float* S, int64_t ls, float* M, float* O) {
  attend_heads<uint16_t>(K, V, hs, nh, q, qs, L, nv, S, ls, M, O);
}

template <typename T>
void attend_rows(const T* const* K, const T* const* V, const float* q, int64_t L, int nv, float* S, float* O) {
  switch (nv) {
    case 1: return attend_rows_nv<1>(K, V, q, L, nv, S, O);
    case 2: return attend_rows_nv<2>(K, V, q, L, nv, S, O);
    case 4: return attend_rows_nv<4>(K, V, q, L, nv, S, O);
    case 5: return attend_rows_nv<5>(K, V, q, L, nv, S, O);
    case 8: return attend_rows_nv<8>(K, V, q, L, nv, S, O);
    default: return attend_rows_nv<0>(K, V, q, L, nv, S, O);
  }
}

void attend_rows_f32(const float* const* K, const float* const* V, const float* q, int64_t L, int nv, float* S,
                     float* O) {
  attend_rows<float>(K, V, q, L, nv, S, O);
}

void attend_rows_bf16(const uint16_t* const* K, const uint16_t* const* V, const float* q, int64_t L, int nv, float* S,
                      float* O) {
  attend_rows<uint16_t>(K, V, q, L, nv, S, O);
}
