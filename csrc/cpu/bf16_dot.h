// bfloat16 products on AVX512-BF16 (vdpbf16ps): a register-blocked micro-GEMM whose operands are
// bfloat16 pairs, and the packing helpers that lay operands out for it. Used by the attention kernel
// (attention.cpp) for bfloat16 inputs on CPUs that have the instruction (AMD Zen 4 and later, Intel
// Cooper Lake and Sapphire Rapids and later).
//
// vdpbf16ps multiplies 32 pairs of bfloat16 exactly and adds each pair's two products to one float32
// lane: twice the multiply-adds of a float32 FMA per instruction. Both operands of every product must
// be bfloat16, so where a product's operand is a float32 intermediate (attention's probabilities and
// score gradients), it is rounded to bfloat16 first, as autocast's bfloat16 matmuls do. The
// instruction treats subnormal inputs as zero and flushes subnormal results (as oneDNN's bfloat16
// GEMMs, which autocast's matmuls run on, do too).
//
// Operand layout ("pairs"): a K x N bfloat16 operand is stored as ceil(K / 2) rows of N 32-bit words,
// word (k2, n) holding elements (2 k2, n) in its low half and (2 k2 + 1, n) in its high half (zero for
// k = K when K is odd). A row-major bfloat16 matrix whose rows are the K dimension (K contiguous) is
// already pairs along K, read with a stride of 2 elements per k2.
//
// Everything here is compiled for AVX-512 + BF16 by function attribute (no global flags): it may only
// run after bf16_dot_supported() said yes.
#pragma once
#include <cstdint>
#include <cstring>

#include "simd.h"

// x86-64 Linux with GCC 11+ or clang 11+ (__builtin_cpu_supports("avx512bf16")), as the other
// dispatching kernels (mlp.cpp, autocast.cpp) are Linux-only.
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 11))
#define MVF_HAVE_BF16_DOT 1
#include <immintrin.h>
#define MVF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define MVF_BF16_INLINE inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define MVF_HAVE_BF16_DOT 0
#endif

namespace mvmae_fast {

// Whether the bfloat16 product path may run: the CPU (and OS) have AVX-512 with BF16, and
// MVMAE_FAST_CPU_ISA does not ask for less (avx512: AVX-512 without the BF16 instructions; avx2 and
// generic: no AVX-512 at all). Read once per process.
bool bf16_dot_supported();

#if MVF_HAVE_BF16_DOT

// The register tile under every bfloat16 product here (dot_block; the linears' GEMMs in autocast.cpp):
// rows r0 .. r0 + MR - 1 of A times columns [n0, n0 + 16 NV) of B, summed over K elements. A's pair k2
// of row r is the 32-bit word at a + r * a_row + k2 * a_k (strides in bfloat16 elements; a row-major
// matrix has a_row its row length and a_k 2); an odd K's last element is taken alone (its pair's high
// half must be zero in B). B is pairs, rows of ldb words. MR x NV accumulators stay in registers over
// the whole K loop (12 at MR = 6, NV = 2, as simd.h's float32 gemm_block); then epi(r, n, acc) for each
// accumulator vector whose columns start below epi.N. With Epi::kColumnSums, epi returns a vector per
// row, and their sum over the tile's rows goes to epi.add_column_sums(n, sum) once.
template <int MR, int NV, class Epi>
MVF_BF16_INLINE void dot_tile(const uint16_t* __restrict a, int64_t a_row, int64_t a_k, int64_t K,
                              const uint32_t* __restrict b, int64_t ldb, int64_t r0, int64_t n0, const Epi& epi) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint16_t* ap = a + r0 * a_row;
  const uint32_t* bp = b + n0;
  const int64_t K2 = K / 2;
  for (int64_t k2 = 0; k2 < K2; ++k2, bp += ldb) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bp + 16 * v);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, ap + r * a_row + k2 * a_k, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  if (K & 1) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bp + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r * a_row + K2 * a_k]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + 16 * v;
    if (n >= epi.N) continue;
    if constexpr (Epi::kColumnSums) {
      __m512 sum = epi(r0, n, acc[0][v]);
      for (int r = 1; r < MR; ++r) sum = _mm512_add_ps(sum, epi(r0 + r, n, acc[r][v]));
      epi.add_column_sums(n, sum);
    } else {
      for (int r = 0; r < MR; ++r) epi(r0 + r, n, acc[r][v]);
    }
  }
}

// dot_block's epilogue: the float32 sums stored at c (rows ldc floats apart).
struct StoreFloats {
  static constexpr bool kColumnSums = false;
  int64_t N;
  float* c;
  int64_t ldc;
  MVF_BF16_INLINE void operator()(int64_t r, int64_t n, __m512 acc) const { _mm512_storeu_ps(c + r * ldc + n, acc); }
};

// C[MR x (16 NV)] at column n0 = sum over k2 < K2 of A(r, k2) . B(k2, n), A(r, k2) the pair at
// a + r * a_row + k2 * a_k, B rows of ldb words, C rows of ldc floats.
template <int MR, int NV>
MVF_BF16_INLINE void dot_block(const uint16_t* __restrict a, int64_t a_row, int64_t a_k, const uint32_t* __restrict b,
                               int64_t ldb, float* __restrict c, int64_t ldc, int64_t K2, int64_t n0) {
  dot_tile<MR, NV>(a, a_row, a_k, 2 * K2, b, ldb, 0, n0, StoreFloats{n0 + 16 * NV, c, ldc});
}

template <int MR>
MVF_BF16_INLINE void dot_rows(const uint16_t* a, int64_t a_row, int64_t a_k, const uint32_t* b, int64_t ldb, float* c,
                              int64_t ldc, int64_t K2, int64_t NC) {
  int64_t n0 = 0;
  for (; n0 + 32 <= NC; n0 += 32) dot_block<MR, 2>(a, a_row, a_k, b, ldb, c, ldc, K2, n0);
  if (n0 < NC) dot_block<MR, 1>(a, a_row, a_k, b, ldb, c, ldc, K2, n0);
}

// C[M x NC] (ldc floats, NC a multiple of 16) = A B over K2 pairs, A(r, k2) at a + r * a_row + k2 * a_k.
// With `ahead`, one ahead->step() per block of six rows (gemm_row_blocks(M) of them, as simd.h's gemm).
MVF_BF16_INLINE void dot_gemm(const uint16_t* a, int64_t a_row, int64_t a_k, const uint32_t* b, int64_t ldb, float* c,
                              int64_t ldc, int64_t M, int64_t K2, int64_t NC, Ahead* ahead) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) {
    dot_rows<6>(a + m * a_row, a_row, a_k, b, ldb, c + m * ldc, ldc, K2, NC);
    if (ahead) ahead->step();
  }
  a += m * a_row;
  c += m * ldc;
  switch (M - m) {
    case 5: dot_rows<5>(a, a_row, a_k, b, ldb, c, ldc, K2, NC); break;
    case 4: dot_rows<4>(a, a_row, a_k, b, ldb, c, ldc, K2, NC); break;
    case 3: dot_rows<3>(a, a_row, a_k, b, ldb, c, ldc, K2, NC); break;
    case 2: dot_rows<2>(a, a_row, a_k, b, ldb, c, ldc, K2, NC); break;
    case 1: dot_rows<1>(a, a_row, a_k, b, ldb, c, ldc, K2, NC); break;
    default: return;
  }
  if (ahead) ahead->step();
}

// dst (ceil(width / 2) x np words, rows ld words apart) = pairs along the row dimension of the
// transpose of rows [0, N): word (w, i) = elements 2w and 2w + 1 of row i (row i at src + row(i)),
// the high half zero past width (an odd width's last element), zero for i >= N. That is the rows'
// first width elements as 32-bit words, transposed, 16 x 16 words at a time in registers.
template <class Row>
MVF_BF16_INLINE void word_columns(const uint16_t* src, const Row& row, int64_t N, int64_t np, int64_t ld,
                                  int64_t width, uint32_t* dst) {
  const int64_t W2 = (width + 1) / 2;
  for (int64_t i0 = 0; i0 < np; i0 += 16) {
    for (int64_t w0 = 0; w0 < W2; w0 += 16) {
      const int64_t ww = std::min<int64_t>(16, W2 - w0);
      const int64_t elems = std::min<int64_t>(2 * ww, width - 2 * w0);
      // The row's elements in one masked load (lanes past elems zero; a memcpy of a variable length
      // was a libc call per row, ~1.4 ms of a tiny bf16 step).
      const __mmask32 m = elems >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << elems) - 1u);
      vec16 r[16];
      for (int64_t ii = 0; ii < 16; ++ii) {
        const __m512i words = i0 + ii < N ? _mm512_maskz_loadu_epi16(m, src + row(i0 + ii) + 2 * w0)
                                          : _mm512_setzero_si512();
        std::memcpy(&r[ii], &words, sizeof words);
      }
      transpose16(r);  // shuffles only: the words' bits pass through unchanged
      for (int64_t w = 0; w < ww; ++w) std::memcpy(dst + (w0 + w) * ld + i0, &r[w], sizeof(vec16));
    }
  }
}

// dst (ceil(N / 2) x dp words) = pairs of rows: word (j2, d) = element d of rows 2 j2 and 2 j2 + 1
// (row j at src + row(j)), zero for d >= width and for a row N.
template <class Row>
MVF_BF16_INLINE void row_pairs(const uint16_t* src, const Row& row, int64_t N, int64_t width, int64_t dp,
                               uint32_t* __restrict dst) {
  for (int64_t j = 0; j < N; j += 2, dst += dp) {
    const uint16_t* __restrict lo = src + row(j);
    if (j + 1 < N) {
      const uint16_t* __restrict hi = src + row(j + 1);
      for (int64_t d = 0; d < width; ++d) dst[d] = lo[d] | static_cast<uint32_t>(hi[d]) << 16;
    } else {
      for (int64_t d = 0; d < width; ++d) dst[d] = lo[d];
    }
    for (int64_t d = width; d < dp; ++d) dst[d] = 0;
  }
}

// The same from float32 rows (N x np at x), each value rounded to bfloat16 (nearest even, as torch).
MVF_BF16_INLINE void float_row_pairs(const float* x, int64_t N, int64_t np, uint32_t* __restrict dst) {
  for (int64_t j = 0; j < N; j += 2, dst += np) {
    const float* __restrict lo = x + j * np;
    if (j + 1 < N) {
      const float* __restrict hi = lo + np;
      for (int64_t i = 0; i < np; ++i)
        dst[i] = float_to_bf16(lo[i]) | static_cast<uint32_t>(float_to_bf16(hi[i])) << 16;
    } else {
      for (int64_t i = 0; i < np; ++i) dst[i] = float_to_bf16(lo[i]);
    }
  }
}

// dst[0, n) = x[0, n) rounded to bfloat16.
MVF_BF16_INLINE void round_to_bf16(const float* __restrict x, int64_t n, uint16_t* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(x[i]);
}

#endif  // MVF_HAVE_BF16_DOT

}  // namespace mvmae_fast
