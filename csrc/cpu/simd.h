// Helpers for the CPU kernels that the compiler vectorises: dtype conversions, a polynomial exp and a
// register-blocked fp32 micro-GEMM on padded buffers.
//
// Portability: the code is plain C++ that GCC/Clang auto-vectorise. Hot entry points are compiled
// several times with MVF_CPU_CLONES (AVX-512, AVX2+FMA, baseline) and the best clone is picked at load
// time, so one wheel runs everywhere and still uses wide vectors where the CPU has them.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#endif

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define MVF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MVF_CPU_CLONES
#endif

#if defined(__GNUC__)
#define MVF_INLINE inline __attribute__((always_inline))
#else
#define MVF_INLINE inline
#endif

namespace mvmae_fast {

// The instruction sets the dispatching kernels choose between (mlp.cpp's variants, autocast.cpp's
// intrinsics, the attention's bfloat16 products in bf16_dot.h), in order.
enum CpuIsa : int { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAvx512Bf16 = 3 };

// The best of them this CPU (and OS) runs, capped by MVMAE_FAST_CPU_ISA=generic|avx2|avx512 (avx512:
// AVX-512 without its BF16 instructions), which the tests use to run every variant on one machine;
// unset or unknown values cap nothing. Read once per process. Off x86-64 Linux with GCC or clang
// (no __builtin_cpu_supports dispatch there): generic. kIsaAvx512Bf16 needs GCC 11+ or clang 11+.
inline int cpu_isa() {
  static const int isa = [] {
    int best = kIsaGeneric;
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
    __builtin_cpu_init();
    const bool fma = __builtin_cpu_supports("fma");
    if (fma && __builtin_cpu_supports("avx2")) best = kIsaAvx2;
    if (fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = kIsaAvx512;
#if (!defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 11)
      if (__builtin_cpu_supports("avx512bf16")) best = kIsaAvx512Bf16;
#endif
    }
#endif
    const char* env = std::getenv("MVMAE_FAST_CPU_ISA");
    const int cap = !env                                 ? kIsaAvx512Bf16
                    : std::strcmp(env, "generic") == 0 ? kIsaGeneric
                    : std::strcmp(env, "avx2") == 0    ? kIsaAvx2
                    : std::strcmp(env, "avx512") == 0  ? kIsaAvx512
                                                       : kIsaAvx512Bf16;
    return std::min(best, cap);
  }();
  return isa;
}

// Whether the CPU has AMX with bfloat16 tiles (CPUID leaf 7, EDX bit 22: Sapphire Rapids and later),
// on which oneDNN's bfloat16 GEMMs run several times faster than any AVX512-BF16 loop.
inline bool cpu_has_amx_bf16() {
  // Read once: CPUID traps to the hypervisor on a virtual machine (~14 us a call measured here).
  static const bool amx = [] {
#if defined(__GNUC__) && defined(__x86_64__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return ((d >> 22) & 1u) != 0;
#else
    return false;
#endif
  }();
  return amx;
}

// A lambda inlined into the (cloned or target-attributed) function that calls it, so it is compiled,
// and vectorised, for that function's instruction set rather than as a separate baseline function.
#if defined(__GNUC__)
#define MVF_LAMBDA_INLINE __attribute__((always_inline))
#else
#define MVF_LAMBDA_INLINE
#endif

// Element types crossing the boundary: 0 float32, 1 bfloat16, 2 float16 (the Python side maps them).
enum CpuDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int64_t kVec = 16;  // floats per 64-byte vector; scratch rows are padded to a multiple

MVF_INLINE int64_t pad_vec(int64_t n) { return (n + kVec - 1) / kVec * kVec; }

MVF_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

MVF_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

MVF_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch does; NaN stays NaN (quieted). Branch-free, so loops over it vectorise.
MVF_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (x >> 16) | 0x40u;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Round to nearest even; overflow gives inf, NaN stays NaN. Branch-free (selects), so loops vectorise.
MVF_INLINE uint16_t float_to_half(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t x = bits & 0x7fffffffu;
  // Normal halves (x >= 2^-14): rebias the exponent (-112 << 23) and round the 13 dropped bits.
  const uint32_t normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;
  // Subnormal halves (x < 2^-14): adding 0.5 leaves the value in units of 2^-24 in the low bits,
  // rounded to nearest even by the float addition itself.
  const uint32_t subnormal = float_to_bits(bits_to_float(x) + 0.5f) - 0x3f000000u;
  uint32_t h = x < 0x38800000u ? subnormal : normal;
  h = x >= 0x477ff000u ? 0x7c00u : h;            // >= 65520 rounds to inf
  h = x > 0x7f800000u ? 0x7e00u : h;             // NaN
  return static_cast<uint16_t>(sign | h);
}

// Exact (with denormals-are-zero off: a subnormal half passes through a subnormal float); branch-free,
// so loops vectorise. The half's exponent and mantissa bits, placed as a float's, are its value times
// 2^-112 (subnormal halves included); the multiply rescales, and inf / NaN get the full exponent.
MVF_INLINE float half_to_float(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const float scaled = bits_to_float(em << 13) * 5.192296858534828e33f;  // 2^112
  const uint32_t inf_nan = em >= 0x7c00u ? 0x7f800000u : 0u;
  return bits_to_float(float_to_bits(scaled) | inf_nan | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

template <int D>
MVF_INLINE float load_as_float(const void* base, int64_t i) {
  if constexpr (D == kFloat32) return static_cast<const float*>(base)[i];
  if constexpr (D == kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  return half_to_float(static_cast<const uint16_t*>(base)[i]);
}

template <int D>
MVF_INLINE void store_from_float(void* base, int64_t i, float v) {
  if constexpr (D == kFloat32) static_cast<float*>(base)[i] = v;
  else if constexpr (D == kBFloat16) static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  else static_cast<uint16_t*>(base)[i] = float_to_half(v);
}

// e^x for x <= 0 (inputs below -87 give ~1e-38 rather than 0): Cody-Waite range reduction and the
// Cephes expf polynomial, ~1 ulp. Branch-free so loops over it vectorise.
MVF_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // (NaN passes through)
  // Round to nearest with the 1.5 * 2^23 trick: no libm call, so the loop stays vectorisable.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(scale);
}

// Flush-to-zero and denormals-are-zero on this thread while in scope (x86; elsewhere nothing). GELU's
// tails (exp(-x^2 / 2) for |x| > ~12) and products with them reach subnormal floats, and every
// arithmetic instruction on a subnormal takes a microcode assist (~100x slower): a few such values in
// an MLP's hidden activations made its GEMMs tens of times slower. The fused layers (mlp.cpp) hold
// one per worker; values below 1.2e-38 become 0 there. (Attention does not: its outputs keep
// subnormal values of v exactly, and its exp clamps at e^-87, a normal float.)
struct FlushDenormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) and DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Memory a kernel will touch soon, requested into L2 a few cache lines at a time while it computes
// something else: the fused layers' next chunk of rows (mlp.cpp, one step() per GEMM tile), the
// attention's next sample (attention.cpp, a few step()s per head). A training step's activations
// are out of cache by the time a layer's kernel reaches them, and the first loop over them
// (LayerNorm's statistics, GELU's pass over fc1's output, a head's rows) otherwise stalls on every
// line: ~8% of the MLP backward in a profile. Paced, the requests neither pile up in the miss queue
// (a burst of thousands of prefetches stalls the core as surely as the loads would) nor land long
// before their use.
struct Ahead {
  static constexpr int kRanges = 4;
  const char* next[kRanges] = {};
  const char* end[kRanges] = {};
  int64_t lines_per_step = 0;

  // [p, p + bytes) joins the requests (up to kRanges ranges; null or empty ranges are skipped). Rows
  // the chunk will only write are requested the same way: the stores then find their lines in L2.
  // (PREFETCHW, which brings a line into L1 for writing, measured 3-4% slower on the whole step.)
  void add(const void* p, int64_t bytes) {
    if (!p || bytes <= 0) return;
    for (int i = 0; i < kRanges; ++i)
      if (!next[i]) {
        end[i] = static_cast<const char*>(p) + bytes;
        // From the start of p's line, so the steps of 64 bytes reach the line holding end - 1.
        next[i] = static_cast<const char*>(p) - (reinterpret_cast<uintptr_t>(p) & 63);
        return;
      }
  }
  // Rows [row, row + rows) of a row-major float matrix `width` floats wide.
  void add_rows(const float* m, int64_t width, int64_t row, int64_t rows) {
    add(m + row * width, rows * width * static_cast<int64_t>(sizeof(float)));
  }
  // Spread what was added over `steps` calls of step().
  void pace(int64_t steps) {
    int64_t lines = 0;
    for (int i = 0; i < kRanges; ++i)
      if (next[i]) lines += (end[i] - next[i] + 63) / 64;
    steps = std::max<int64_t>(1, steps);
    lines_per_step = (lines + steps - 1) / steps;
  }
  MVF_INLINE void step() {
    int64_t left = lines_per_step;
    for (int i = 0; i < kRanges && left > 0; ++i)
      for (; next[i] && next[i] < end[i] && left > 0; next[i] += 64, --left) __builtin_prefetch(next[i], 0, 2);
  }
};

// Sixteen floats as one value (GCC/Clang vector extensions): one zmm register in the AVX-512 clone,
// two ymm in the AVX2 clone (12 accumulators + operands fit its 16 registers), four xmm in the
// baseline clone (which spills; it only runs on CPUs older than AVX2).
typedef float vec16 __attribute__((vector_size(64)));
// The same at any float-aligned address: a load or store through it is one (unaligned) vector
// instruction. (Where both branches of `count == 16 ? 16 : count` floats were copied with memcpy, GCC
// merged them into one memcpy of count floats: a library call for every vector, its registers
// spilled around it.)
typedef float vec16u __attribute__((vector_size(64), aligned(4), may_alias));

// A 16 x 16 block transposed in registers: four butterfly stages, each swapping the off-diagonal
// S x S sub-blocks (row bit S with lane bit S) with two-input shuffles (vpermt2ps on AVX-512).
typedef int32_t ivec16 __attribute__((vector_size(64)));

template <int S>
MVF_INLINE void butterfly(vec16* r, ivec16 lo, ivec16 hi) {
  for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const vec16 a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, lo);      // lane j: a[j], or b[j - S] where lane bit S is set
    r[i + S] = __builtin_shuffle(a, b, hi);  // lane j: a[j + S], or b[j] where lane bit S is set
  }
}

MVF_INLINE void transpose16(vec16* r) {
  butterfly<1>(r, ivec16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
               ivec16{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  butterfly<2>(r, ivec16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
               ivec16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  butterfly<4>(r, ivec16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
               ivec16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  butterfly<8>(r, ivec16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
               ivec16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
}

// C[MR x NC] = A[MR x K] * B[K x NC], row-major with leading dims; NC a multiple of kVec. Column
// blocks two vectors wide (one for an odd last block) keep MR x NV accumulator vectors in registers
// over the whole K loop: 12 independent FMA chains at MR = 6 keep both FMA ports busy, where one
// vector's 6 did not (~20% on attention's 17- and 65-row products).
// TRANS_A: A is stored transposed, (K x MR) with leading dim lda, so C = A^T B without a copy.
template <int MR, int NV, bool TRANS_A>
MVF_INLINE void gemm_block(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                           float* __restrict C, int64_t ldc, int64_t K, int64_t n0) {
  vec16 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vec16{};
  const float* b = B + n0;
  for (int64_t k = 0; k < K; ++k, b += ldb) {
    vec16 bv[NV];  // loaded with memcpy: unaligned, and no vec16 crosses a call (no ABI note)
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + kVec * v, sizeof(vec16));
    for (int r = 0; r < MR; ++r) {
      const float a = TRANS_A ? A[k * lda + r] : A[r * lda + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(C + r * ldc + n0 + kVec * v, &acc[r][v], sizeof(vec16));
}

template <int MR, bool TRANS_A>
MVF_INLINE void gemm_rows(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                          float* __restrict C, int64_t ldc, int64_t K, int64_t NC) {
  int64_t n0 = 0;
  for (; n0 + 2 * kVec <= NC; n0 += 2 * kVec) gemm_block<MR, 2, TRANS_A>(A, lda, B, ldb, C, ldc, K, n0);
  if (n0 < NC) gemm_block<MR, 1, TRANS_A>(A, lda, B, ldb, C, ldc, K, n0);
}

// C[M x NC] = op(A) * B[K x NC] with op(A) = A[M x K], or A^T for A stored (K x M) when TRANS_A
// (see gemm_rows). With `ahead`, one ahead->step() per block of rows: gemm_row_blocks(M) of them.
MVF_INLINE int64_t gemm_row_blocks(int64_t M) { return M / 6 + (M % 6 != 0); }

template <bool TRANS_A = false>
MVF_INLINE void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     int64_t M, int64_t K, int64_t NC, Ahead* ahead = nullptr) {
  const int64_t row_step = TRANS_A ? 1 : lda;  // from one row of op(A) to the next
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) {
    gemm_rows<6, TRANS_A>(A + m * row_step, lda, B, ldb, C + m * ldc, ldc, K, NC);
    if (ahead) ahead->step();
  }
  A += m * row_step;
  C += m * ldc;
  switch (M - m) {
    case 5: gemm_rows<5, TRANS_A>(A, lda, B, ldb, C, ldc, K, NC); break;
    case 4: gemm_rows<4, TRANS_A>(A, lda, B, ldb, C, ldc, K, NC); break;
    case 3: gemm_rows<3, TRANS_A>(A, lda, B, ldb, C, ldc, K, NC); break;
    case 2: gemm_rows<2, TRANS_A>(A, lda, B, ldb, C, ldc, K, NC); break;
    case 1: gemm_rows<1, TRANS_A>(A, lda, B, ldb, C, ldc, K, NC); break;
    default: return;
  }
  if (ahead) ahead->step();
}

// ---- Row helpers shared by the fused layers (mlp.cpp) and the autocast layers (autocast.cpp) ----

// GELU(x) = x * Phi(x) and GELU'(x) = Phi(x) + x * phi(x), Phi from Abramowitz & Stegun 7.1.26 (erf to
// 1.5e-7, the approximation PyTorch's vectorised GELU uses) written as 0.5 * erfc(|z|) so the left
// tail keeps its relative accuracy; the exp(-x^2 / 2) it needs is phi's too. Past |x| = 13.19, where
// exp(-x^2 / 2) is below float's normal range (exp_nonpositive clamps there), the limits are exact:
// gelu = x or 0, gelu' = 1 or 0 (also for x = +-inf).
constexpr float kGeluTailZ2 = 87.0f;  // z^2 past which exp(-z^2) underflows
MVF_INLINE void gelu_and_grad(float x, float& value, float& grad) {
  const float z = x * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * std::fabs(z));
  const float e = exp_nonpositive(-z * z);
  const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                      0.254829592f) * t;
  const float half_erfc = 0.5f * poly * e;
  const float cdf = z < 0.0f ? half_erfc : 1.0f - half_erfc;
  const bool tail = z * z > kGeluTailZ2;
  value = tail ? (z > 0.0f ? x : 0.0f) : x * cdf;
  grad = tail ? (z > 0.0f ? 1.0f : 0.0f) : cdf + x * e * 0.39894228040143268f;
}

// The first `count` floats at p, zeros after; a full vector in one load (see vec16u).
MVF_INLINE vec16 load_lanes(const float* p, int64_t count) {
  if (count == 16) return *reinterpret_cast<const vec16u*>(p);
  vec16 v{};
  std::memcpy(&v, p, static_cast<size_t>(count) * sizeof(float));
  return v;
}

// v's first `count` lanes to p; a full vector in one store (see vec16u).
MVF_INLINE void store_lanes(float* p, const vec16& v, int64_t count) {
  if (count == 16) *reinterpret_cast<vec16u*>(p) = v;
  else std::memcpy(p, &v, static_cast<size_t>(count) * sizeof(float));
}

MVF_INLINE float hsum(const vec16& v) {
  float lanes[16];
  std::memcpy(lanes, &v, sizeof lanes);
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += lanes[i];
  return s;
}

// sum_d f(d) over d < n for a vectorisable f(float* dst16, d0) evaluated 16 lanes at a time (tail
// lanes zero); float sums do not auto-vectorise without reassociation, hence the explicit vectors.
template <class Fn>
MVF_INLINE float vector_sum(int64_t n, const Fn& lanes_at) {
  vec16 acc{};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) acc += lanes_at(d, 16);
  if (d < n) acc += lanes_at(d, n - d);
  return hsum(acc);
}

// LayerNorm statistics of one row, as torch computes them: mean and 1 / sqrt(biased var + eps).
MVF_INLINE void row_stats(const float* x, int64_t n, float eps, float& mean, float& rstd) {
  mean = vector_sum(n, [&](int64_t d, int64_t c) { return load_lanes(x + d, c); }) / static_cast<float>(n);
  const float m = mean;
  const float var = vector_sum(n, [&](int64_t d, int64_t c) {
    float dev[16] = {};  // lanes past the row stay 0, not -mean
    for (int64_t i = 0; i < c; ++i) dev[i] = x[d + i] - m;
    vec16 v;
    std::memcpy(&v, dev, sizeof v);
    return v * v;
  }) / static_cast<float>(n);
  rstd = 1.0f / std::sqrt(var + eps);
}

// dst = (x - mean) * rstd * gamma + beta over a row of n, zero from n to the padded width np.
MVF_INLINE void norm_row(const float* __restrict x, int64_t n, int64_t np, const float* __restrict gamma,
                         const float* __restrict beta, float mean, float rstd, float* __restrict dst) {
  for (int64_t d = 0; d < n; ++d) dst[d] = (x[d] - mean) * rstd * gamma[d] + beta[d];
  for (int64_t d = n; d < np; ++d) dst[d] = 0.0f;
}

// LayerNorm's backward for one row, from dxn (the gradient of the normalised row): with
// xhat = (x - mean) rstd and g = dxn gamma, dx = rstd (g - mean(g) - xhat mean(g xhat)) (+ res);
// dgamma += dxn xhat, dbeta += dxn.
MVF_INLINE void norm_backward_row(const float* __restrict x, const float* __restrict dxn, int64_t D, float mean,
                                  float rstd, const float* __restrict gamma, const float* __restrict res,
                                  float* __restrict dx, float* __restrict dgamma, float* __restrict dbeta) {
  const float sum_g = vector_sum(D, [&](int64_t d, int64_t n) { return load_lanes(dxn + d, n) * load_lanes(gamma + d, n); });
  const float sum_gx = vector_sum(D, [&](int64_t d, int64_t n) {
    const vec16 xhat = (load_lanes(x + d, n) - mean) * rstd;
    return load_lanes(dxn + d, n) * load_lanes(gamma + d, n) * xhat;
  });
  const float c1 = sum_gx / static_cast<float>(D), c2 = sum_g / static_cast<float>(D);
  for (int64_t d = 0; d < D; ++d) {
    const float xhat = (x[d] - mean) * rstd;
    dx[d] = rstd * (dxn[d] * gamma[d] - c2 - xhat * c1);
    dgamma[d] += dxn[d] * xhat;
    dbeta[d] += dxn[d];
  }
  if (res)
    for (int64_t d = 0; d < D; ++d) dx[d] += res[d];
}

}  // namespace mvmae_fast
