// The pre-norm block's elementwise work under CPU bfloat16 autocast, around the linears that oneDNN
// runs in bfloat16 (AMX / AVX512-BF16; no float32 kernel matches them there). Unfused, autocast runs
// LayerNorm in float32 and casts its output to bfloat16, GELU and its backward as separate passes, the
// bias gradients as more passes, casts the gradients back and forth and adds the residual's gradient
// separately. Here (mvmae_fast/ops/mlp/autocast.py calls these between its torch.mm calls):
//   layer_norm_bf16_forward   x (f32) -> LayerNorm(x) written as bfloat16 (+ mean, rstd per row)
//   gelu_bf16_forward         pre (bf16) -> gelu(pre) (bf16) and gelu'(pre) * 2^14 as float16, so the
//                             backward is one multiply instead of GELU's exp / erf a second time; one
//                             lookup per element in a table of all 2^16 inputs' results (gelu_table)
//   cast_bf16_colsum          dY (f32) -> dY as bfloat16 and its column sums (fc2's bias gradient)
//   gelu_bf16_backward        dA (bf16), gelu' -> dH = dA gelu' (bf16) and its column sums (fc1's bias)
//   layer_norm_bf16_backward  dXn (bf16) -> dx (f32, + the residual's gradient), dgamma, dbeta
//   colsum_bf16               column sums of a bfloat16 gradient (the qkv bias's), no float copy
//   add_bf16                  x (f32) + y (bf16) -> f32: the residual, without upcasting y first
// and, on AVX512-BF16, the linears themselves (linear_bf16_*, below the elementwise kernels): the
// forward's product + bias with GELU or the residual in the epilogue, the input gradient with GELU's
// backward in its epilogue, the weight gradient rounded and widened in its epilogue.
// Rows are split into pieces the threads take (parallel_pieces: each its own contiguous share first);
// column sums go through 64-row block sums into one partial per piece, added in piece order (the same
// bits for any thread count).
#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "bf16_dot.h"
#include "parallel.h"
#include "simd.h"

namespace mvmae_fast {
namespace {

constexpr int64_t kBlock = 64;           // rows per block sum
constexpr float kGeluScale = 16384.0f;  // gelu' in [-0.17, 1.13] stored times 2^14: float16's normal
                                         // range then reaches down to |gelu'| ~ 4e-9 (x ~ -6.3)


// Row blocks per piece of a GEMM's parallel_pieces, given a block's multiply-adds: at most 64 pieces, and
// at least ~512k multiply-adds each (~2.5 us of a core; claiming a piece costs ~0.1 us).
[[maybe_unused]] int64_t gemm_piece(int64_t blocks, int64_t block_macs) {
  return std::max<int64_t>({1, (blocks + 63) / 64, (int64_t{1} << 19) / std::max<int64_t>(1, block_macs)});
}

// Pieces of rows for with_column_sums: at least kBlock rows and ~8k values each, at most 16 (whatever
// the thread count).
int64_t slot_count(int64_t rows, int64_t cols) {
  const int64_t min_rows = std::max<int64_t>(kBlock, 8192 / std::max<int64_t>(1, cols));
  return std::max<int64_t>(1, std::min<int64_t>(16, rows / min_rows));
}

// colsum[0, cols) = the sum of `count` partial sums (rows `stride` floats apart), in order.
void add_partials(const float* partial, int64_t count, int64_t stride, int64_t cols, float* colsum) {
  std::copy(partial, partial + cols, colsum);
  for (int64_t p = 1; p < count; ++p)
    for (int64_t j = 0; j < cols; ++j) colsum[j] += partial[p * stride + j];
}

// Runs fn(begin, end, partial) over each slot's rows with `partial` (cols floats, zeroed) its column
// sums (the threads take slots as parallel_pieces hands them out), then sums the partials in slot
// order into colsum: the same bits for any thread count.
template <class Fn>
void with_column_sums(int64_t rows, int64_t cols, int threads, float* colsum, const Fn& fn) {
  const int64_t slots = slot_count(rows, cols);
  std::vector<float> partial(static_cast<size_t>(slots * cols), 0.0f);
  parallel_pieces(slots, 1, threads, [&](int64_t s, int64_t, int64_t) {
    fn(rows * s / slots, rows * (s + 1) / slots, partial.data() + s * cols);
  });
  add_partials(partial.data(), slots, cols, cols, colsum);
}

// Rows [begin, end) in blocks of kBlock: row(r, acc) adds row r's contribution to the block's column
// sums acc (cols floats, zeroed per block), which are then added into sum. Inlined into each caller's
// clones, so the row loops vectorise there.
template <class Row>
MVF_INLINE void block_column_sums(int64_t begin, int64_t end, int64_t cols, float* __restrict sum, const Row& row) {
  std::vector<float> block(static_cast<size_t>(cols));
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    std::fill(block.begin(), block.end(), 0.0f);
    for (int64_t r = b0; r < std::min(end, b0 + kBlock); ++r) row(r, block.data());
    for (int64_t j = 0; j < cols; ++j) sum[j] += block[j];
  }
}

MVF_CPU_CLONES
void cast_colsum_rows(const float* __restrict g, uint16_t* __restrict out, float* __restrict sum, int64_t begin,
                      int64_t end, int64_t cols) {
  block_column_sums(begin, end, cols, sum, [&](int64_t r, float* __restrict acc) MVF_LAMBDA_INLINE {
    const float* __restrict row = g + r * cols;
    uint16_t* __restrict o = out + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      acc[j] += row[j];
      o[j] = float_to_bf16(row[j]);
    }
  });
}

MVF_CPU_CLONES
void gelu_backward_rows(const uint16_t* __restrict dact, const uint16_t* __restrict deriv, uint16_t* __restrict dpre,
                        float* __restrict sum, int64_t begin, int64_t end, int64_t cols) {
  block_column_sums(begin, end, cols, sum, [&](int64_t r, float* __restrict acc) MVF_LAMBDA_INLINE {
    const uint16_t* __restrict da = dact + r * cols;
    const uint16_t* __restrict dg = deriv + r * cols;
    uint16_t* __restrict o = dpre + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const float v = bf16_to_float(da[j]) * (half_to_float(dg[j]) * (1.0f / kGeluScale));
      acc[j] += v;
      o[j] = float_to_bf16(v);
    }
  });
}

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define MVF_AUTOCAST_AVX512 1
#define MVF_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
// The helpers below need AVX-512 only, so both these kernels and the bf16_dot.h ones inline them.
#define MVF_AVX512_HELPER inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq")))

// The first n (<= 16) lanes.
MVF_AVX512_HELPER __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
}

// 16 bfloat16 values (the masked lanes; the rest 0) as floats: a shift.
MVF_AVX512_HELPER __m512 load_bf16x16(__mmask16 lanes, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16));
}

// 16 floats rounded to bfloat16 (nearest even, NaN quieted, as float_to_bf16; vcvtneps2bf16 would flush
// subnormals): the 16-bit patterns in the low halves of 32-bit lanes.
MVF_AVX512_HELPER __m512i round_bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
}

// 16 floats stored as bfloat16 (round_bf16x16) in the masked lanes.
MVF_AVX512_HELPER void store_bf16x16(__mmask16 lanes, uint16_t* p, __m512 v) {
  _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtepi32_epi16(round_bf16x16(v)));
}

// The forward's arithmetic with AVX-512 intrinsics, 16 values per step: the compiler's vectorisation of
// the generic loop spends most of its instructions on the bfloat16 / float16 conversions and the
// division, which here are a shift, vpmovdw, vcvtps2ph and rcp14 with one Newton step.
MVF_AVX512_TARGET
void gelu_forward_avx512(const uint16_t* __restrict pre, uint16_t* __restrict act, uint16_t* __restrict deriv,
                         int64_t begin, int64_t end) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  int64_t i = begin;
  for (; i < end; i += 16) {
    const __mmask16 lanes = first_lanes(end - i);
    const __m512 x = load_bf16x16(lanes, pre + i);
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 az = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(z), abs_mask));
    const __m512 den = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, one);
    __m512 t = _mm512_rcp14_ps(den);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));  // Newton: ~2^-28 relative
    // e = exp(-z^2), as exp_nonpositive: Cody-Waite reduction, the Cephes polynomial, scalef.
    const __m512 arg = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z), _mm512_set1_ps(-87.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(arg, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), arg);
    r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, one));
    const __m512 e = _mm512_scalef_ps(p, k);
    __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(half, poly), e);
    const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, half_erfc), half_erfc);
    __m512 value = _mm512_mul_ps(x, cdf);
    __m512 grad = _mm512_fmadd_ps(_mm512_mul_ps(x, e), _mm512_set1_ps(0.39894228040143268f), cdf);
    // The tails as gelu_and_grad: past z^2 = 87, x or 0 and 1 or 0 (this also keeps +-inf from the
    // Newton step's inf * 0).
    const __mmask16 tail = _mm512_cmp_ps_mask(_mm512_mul_ps(z, z), _mm512_set1_ps(kGeluTailZ2), _CMP_GT_OQ);
    const __mmask16 right = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ);
    value = _mm512_mask_blend_ps(tail, value, _mm512_maskz_mov_ps(right, x));
    grad = _mm512_mask_blend_ps(tail, grad, _mm512_maskz_mov_ps(right, one));
    store_bf16x16(lanes, act + i, value);
    _mm256_mask_storeu_epi16(deriv + i, lanes,
                             _mm512_cvtps_ph(_mm512_mul_ps(grad, _mm512_set1_ps(kGeluScale)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// GELU's backward with AVX-512 intrinsics: the generic loop's arithmetic in the same order (block
// sums of kBlock rows per column, then added into sum), with float16 -> float32 as one vcvtph2ps
// instead of the portable bit manipulation, and masked loads and stores for the ragged last columns.
MVF_AVX512_TARGET
void gelu_backward_avx512(const uint16_t* __restrict dact, const uint16_t* __restrict deriv, uint16_t* __restrict dpre,
                          float* __restrict sum, int64_t begin, int64_t end, int64_t cols) {
  std::vector<float> block(static_cast<size_t>(cols));
  const __m512 inv_scale = _mm512_set1_ps(1.0f / kGeluScale);
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    std::fill(block.begin(), block.end(), 0.0f);
    for (int64_t r = b0; r < std::min(end, b0 + kBlock); ++r) {
      const uint16_t* da = dact + r * cols;
      const uint16_t* dg = deriv + r * cols;
      uint16_t* o = dpre + r * cols;
      for (int64_t j = 0; j < cols; j += 16) {
        const __mmask16 lanes = first_lanes(cols - j);
        const __m512 g = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, dg + j));
        const __m512 v = _mm512_mul_ps(load_bf16x16(lanes, da + j), _mm512_mul_ps(g, inv_scale));
        _mm512_mask_storeu_ps(block.data() + j, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, block.data() + j), v));
        store_bf16x16(lanes, o + j, v);
      }
    }
    for (int64_t j = 0; j < cols; ++j) sum[j] += block[j];
  }
}

// MVMAE_FAST_CPU_ISA=avx2|generic turns the intrinsics off (cpu_isa in simd.h), so tests can run the
// generic loop on an AVX-512 machine.
bool has_avx512() { return cpu_isa() >= kIsaAvx512; }
#endif

MVF_CPU_CLONES
void gelu_forward_rows(const uint16_t* __restrict pre, uint16_t* __restrict act, uint16_t* __restrict deriv,
                       int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float value, grad;
    gelu_and_grad(bf16_to_float(pre[i]), value, grad);
    act[i] = float_to_bf16(value);
    deriv[i] = float_to_half(grad * kGeluScale);
  }
}

MVF_CPU_CLONES
void layer_norm_rows(const float* __restrict x, const float* __restrict gamma, const float* __restrict beta, float eps,
                     uint16_t* __restrict out, float* __restrict mean, float* __restrict rstd, int64_t begin,
                     int64_t end, int64_t dim) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict row = x + r * dim;
    float m, s;
    row_stats(row, dim, eps, m, s);
    mean[r] = m;
    rstd[r] = s;
    uint16_t* __restrict o = out + r * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = float_to_bf16((row[d] - m) * s * gamma[d] + beta[d]);
  }
}

// dgamma and dbeta of each slot at sums[0, dim) and sums[dim, 2 dim).
MVF_CPU_CLONES
void layer_norm_backward_rows(const uint16_t* __restrict dy, const float* __restrict x, const float* __restrict mean,
                              const float* __restrict rstd, const float* __restrict gamma,
                              const float* __restrict residual, float* __restrict dx, float* __restrict sums,
                              int64_t begin, int64_t end, int64_t dim) {
  std::vector<float> dxn(static_cast<size_t>(dim));
  block_column_sums(begin, end, 2 * dim, sums, [&](int64_t r, float* __restrict acc) MVF_LAMBDA_INLINE {
    const uint16_t* __restrict g = dy + r * dim;
    for (int64_t d = 0; d < dim; ++d) dxn[d] = bf16_to_float(g[d]);
    norm_backward_row(x + r * dim, dxn.data(), dim, mean[r], rstd[r], gamma, residual ? residual + r * dim : nullptr,
                      dx + r * dim, acc, acc + dim);
  });
}

MVF_CPU_CLONES
void colsum_rows(const uint16_t* __restrict g, float* __restrict sum, int64_t begin, int64_t end, int64_t cols) {
  block_column_sums(begin, end, cols, sum, [&](int64_t r, float* __restrict acc) MVF_LAMBDA_INLINE {
    const uint16_t* __restrict row = g + r * cols;
    for (int64_t j = 0; j < cols; ++j) acc[j] += bf16_to_float(row[j]);
  });
}

MVF_CPU_CLONES
void add_rows(const float* __restrict x, const uint16_t* __restrict y, float* __restrict out, int64_t begin,
              int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = x[i] + bf16_to_float(y[i]);
}

// GELU's forward on bfloat16 input has only 2^16 distinct inputs: one table of every input's result
// (bfloat16 gelu in the low half, float16 gelu' * 2^14 in the high half), computed once by the kernels
// above, turns each element into one lookup (a 16-lane gather on AVX-512) instead of ~60 vector
// instructions of erf and exp. Same bits as computing it, by construction. 256 KiB.
const uint32_t* gelu_table() {
  static const std::vector<uint32_t> table = [] {
    constexpr int64_t n = 1 << 16;
    std::vector<uint16_t> in(n), act(n), deriv(n);
    for (int64_t i = 0; i < n; ++i) in[i] = static_cast<uint16_t>(i);
    const FlushDenormals flush;
#ifdef MVF_AUTOCAST_AVX512
    if (has_avx512()) gelu_forward_avx512(in.data(), act.data(), deriv.data(), 0, n);
    else
#endif
      gelu_forward_rows(in.data(), act.data(), deriv.data(), 0, n);
    std::vector<uint32_t> t(n);
    for (int64_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(act[i]) | (static_cast<uint32_t>(deriv[i]) << 16);
    return t;
  }();
  return table.data();
}

#ifdef MVF_AUTOCAST_AVX512
MVF_AVX512_TARGET
void gelu_lookup_avx512(const uint32_t* __restrict table, const uint16_t* __restrict pre, uint16_t* __restrict act,
                        uint16_t* __restrict deriv, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 lanes = first_lanes(end - i);
    const __m512i index = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, pre + i));
    const __m512i entry = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, index, table, 4);
    _mm256_mask_storeu_epi16(act + i, lanes, _mm512_cvtepi32_epi16(entry));
    _mm256_mask_storeu_epi16(deriv + i, lanes, _mm512_cvtepi32_epi16(_mm512_srli_epi32(entry, 16)));
  }
}
#endif

#if MVF_HAVE_BF16_DOT
// The linears' forward on AVX512-BF16 (linear_bf16_cpu below): a (rows x K, bfloat16) times w^T with
// w (N x K) the float32 parameter, plus the bias, rounded to bfloat16 once, as autocast's addmm on
// oneDNN does, and then the epilogue, while the tile is still in registers. The products are
// bf16_dot.h's dot_tile (6 rows x 32 columns of float32 accumulators over the pairs of K); the sums' order is
// ours, so a result differs from oneDNN's in the last bfloat16 bit where a float32 sum lands on a
// rounding boundary (~1e-4 of the outputs).
// Rows [n0, n0 + 16) of w (those below N) rounded to bfloat16 into wb, and their pairs along K
// transposed into packed (ceil(K / 2) x np words, word_columns): word (k2, n) = wb[n][2 k2] |
// wb[n][2 k2 + 1] << 16, zero past K and for n >= N.
MVF_BF16_TARGET void pack_weight_block(const float* w, int64_t N, int64_t K, int64_t np, int64_t n0, uint16_t* wb,
                                       uint32_t* packed) {
  const int64_t rows = std::min<int64_t>(16, N - n0);
  for (int64_t n = n0; n < n0 + rows; ++n)
    for (int64_t k = 0; k < K; k += 16) store_bf16x16(first_lanes(K - k), wb + n * K + k,
                                                      _mm512_maskz_loadu_ps(first_lanes(K - k), w + n * K + k));
  word_columns(wb, [n0, K](int64_t i) { return (n0 + i) * K; }, rows, 16, np, K, packed + n0);
}

// The epilogues: each gets one accumulator vector, output row r, columns [c, c + 16) (c < np; the
// columns at and past N are padding, not stored), and adds the bias (float32 values of the bfloat16
// bias, padded to np) before rounding once.
struct Epilogue {
  const float* bias;
  int64_t N;
  MVF_BF16_INLINE __mmask16 lanes(int64_t c) const { return first_lanes(N - c); }
  MVF_BF16_INLINE __m512i rounded(int64_t c, __m512 acc) const {
    return round_bf16x16(_mm512_add_ps(acc, _mm512_loadu_ps(bias + c)));
  }
};

// out (rows x N, bfloat16) = the rounded sums.
struct StoreEpilogue : Epilogue {
  static constexpr bool kColumnSums = false;
  uint16_t* out;
  MVF_BF16_INLINE void operator()(int64_t r, int64_t c, __m512 acc) const {
    _mm256_mask_storeu_epi16(out + r * N + c, lanes(c), _mm512_cvtepi32_epi16(rounded(c, acc)));
  }
};

// act = gelu(rounded sums) (bfloat16) and deriv = gelu'(them) * 2^14 (float16): one gather in
// gelu_table, as gelu_bf16_forward does on the stored sums.
struct GeluEpilogue : Epilogue {
  static constexpr bool kColumnSums = false;
  const uint32_t* table;
  uint16_t* act;
  uint16_t* deriv;
  MVF_BF16_INLINE void operator()(int64_t r, int64_t c, __m512 acc) const {
    const __mmask16 m = lanes(c);
    const __m512i entry = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rounded(c, acc), table, 4);
    _mm256_mask_storeu_epi16(act + r * N + c, m, _mm512_cvtepi32_epi16(entry));
    _mm256_mask_storeu_epi16(deriv + r * N + c, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(entry, 16)));
  }
};

// out (rows x N, float32) = residual + the rounded sums: add_bf16's residual, without storing them.
struct ResidualEpilogue : Epilogue {
  static constexpr bool kColumnSums = false;
  const float* residual;
  float* out;
  MVF_BF16_INLINE void operator()(int64_t r, int64_t c, __m512 acc) const {
    const __mmask16 m = lanes(c);
    const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(rounded(c, acc), 16));
    _mm512_mask_storeu_ps(out + r * N + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, residual + r * N + c), y));
  }
};

template <int MR, class Epi>
MVF_BF16_INLINE void linear_row_block(const uint16_t* a, int64_t a_row, int64_t a_k, int64_t K,
                                        const uint32_t* packed, int64_t np, int64_t r0, const Epi& epi) {
  int64_t n0 = 0;
  for (; n0 + 32 <= np; n0 += 32) dot_tile<MR, 2>(a, a_row, a_k, K, packed, np, r0, n0, epi);
  if (n0 < np) dot_tile<MR, 1>(a, a_row, a_k, K, packed, np, r0, n0, epi);
}

// Rows [r0, r1): blocks of 6 rows, each across all the columns (packed stays in L2, a block's rows
// in L1).
template <class Epi>
MVF_BF16_TARGET void linear_rows(const uint16_t* a, int64_t a_row, int64_t a_k, int64_t K, const uint32_t* packed,
                                   int64_t np, int64_t r0, int64_t r1, const Epi& epi) {
  int64_t r = r0;
  for (; r + 6 <= r1; r += 6) linear_row_block<6>(a, a_row, a_k, K, packed, np, r, epi);
  switch (r1 - r) {
    case 5: linear_row_block<5>(a, a_row, a_k, K, packed, np, r, epi); break;
    case 4: linear_row_block<4>(a, a_row, a_k, K, packed, np, r, epi); break;
    case 3: linear_row_block<3>(a, a_row, a_k, K, packed, np, r, epi); break;
    case 2: linear_row_block<2>(a, a_row, a_k, K, packed, np, r, epi); break;
    case 1: linear_row_block<1>(a, a_row, a_k, K, packed, np, r, epi); break;
    default: break;
  }
}

// Pair-rows [m0, m1) of src (rows x cols bfloat16) into dst (np words each, rows of dst from m0):
// row_pairs on that range (zero past cols, and for a last odd row's partner).
MVF_BF16_TARGET void pair_rows_range(const uint16_t* src, int64_t rows, int64_t cols, int64_t np, int64_t m0,
                                     int64_t m1, uint32_t* dst) {
  row_pairs(src, [m0, cols](int64_t j) { return (2 * m0 + j) * cols; }, std::min(rows - 2 * m0, 2 * (m1 - m0)), cols,
            np, dst + m0 * np);
}

// dact (bfloat16, rounded as autocast's mm) times gelu'(pre) (deriv: float16, times 2^14), rounded:
// dpre, as gelu_bf16_backward; the unrounded products' column sums go into this thread's partial.
struct GeluBackwardEpilogue {
  static constexpr bool kColumnSums = true;
  int64_t N;
  const uint16_t* deriv;
  uint16_t* dpre;
  float* partial;
  MVF_BF16_INLINE __m512 operator()(int64_t r, int64_t c, __m512 acc) const {
    const __mmask16 m = first_lanes(N - c);
    const __m512 dact = _mm512_castsi512_ps(_mm512_slli_epi32(round_bf16x16(acc), 16));
    const __m512 g = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, deriv + r * N + c));
    const __m512 v = _mm512_mul_ps(dact, _mm512_mul_ps(g, _mm512_set1_ps(1.0f / kGeluScale)));
    store_bf16x16(m, dpre + r * N + c, v);
    return v;  // zero in the lanes past N (deriv loaded as zero there)
  }
  MVF_BF16_INLINE void add_column_sums(int64_t c, __m512 sum) const {
    _mm512_storeu_ps(partial + c, _mm512_add_ps(_mm512_loadu_ps(partial + c), sum));
  }
};

// A weight gradient's tiles over one chunk of the rows' pairs: the first chunk stores its sums in dw
// (N x K float32), later ones add to them, the last rounds the total to bfloat16 (autocast's mm
// output, then .float()).
struct WeightGradEpilogue {
  static constexpr bool kColumnSums = false;
  int64_t N;  // dw's columns (the input features); the tile's "N"
  float* dw;
  bool first, last;
  MVF_BF16_INLINE void operator()(int64_t r, int64_t c, __m512 acc) const {
    const __mmask16 m = first_lanes(N - c);
    float* p = dw + r * N + c;
    if (!first) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, p));
    if (last) acc = _mm512_castsi512_ps(_mm512_slli_epi32(round_bf16x16(acc), 16));
    _mm512_mask_storeu_ps(p, m, acc);
  }
};

// out (rows x N, bfloat16) = the rounded sums, no bias.
struct StoreNoBias {
  static constexpr bool kColumnSums = false;
  int64_t N;
  uint16_t* out;
  MVF_BF16_INLINE void operator()(int64_t r, int64_t c, __m512 acc) const {
    _mm256_mask_storeu_epi16(out + r * N + c, first_lanes(N - c), _mm512_cvtepi32_epi16(round_bf16x16(acc)));
  }
};
#endif  // MVF_HAVE_BF16_DOT

}  // namespace

void colsum_bf16_cpu(const uint16_t* g, float* colsum, int64_t rows, int64_t cols, int threads) {
  with_column_sums(rows, cols, threads, colsum, [&](int64_t r0, int64_t r1, float* sum) {
    colsum_rows(g, sum, r0, r1, cols);
  });
}

void add_bf16_cpu(const float* x, const uint16_t* y, float* out, int64_t numel, int threads) {
  parallel_for(numel, 32768, threads, [&](int64_t i0, int64_t i1) { add_rows(x, y, out, i0, i1); });
}

void layer_norm_bf16_forward_cpu(const float* x, const float* gamma, const float* beta, float eps, uint16_t* out,
                                 float* mean, float* rstd, int64_t rows, int64_t dim, int threads) {
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim)), threads, [&](int64_t r0, int64_t r1) {
    layer_norm_rows(x, gamma, beta, eps, out, mean, rstd, r0, r1, dim);
  });
}

void gelu_bf16_forward_cpu(const uint16_t* pre, uint16_t* act, uint16_t* deriv, int64_t numel, int threads) {
  const uint32_t* table = gelu_table();
  parallel_for(numel, 16384, threads, [&](int64_t i0, int64_t i1) {
#ifdef MVF_AUTOCAST_AVX512
    if (has_avx512()) return gelu_lookup_avx512(table, pre, act, deriv, i0, i1);
#endif
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t entry = table[pre[i]];
      act[i] = static_cast<uint16_t>(entry);
      deriv[i] = static_cast<uint16_t>(entry >> 16);
    }
  });
}

void cast_bf16_colsum_cpu(const float* g, uint16_t* out, float* colsum, int64_t rows, int64_t cols, int threads) {
  with_column_sums(rows, cols, threads, colsum, [&](int64_t r0, int64_t r1, float* sum) {
    cast_colsum_rows(g, out, sum, r0, r1, cols);
  });
}

void gelu_bf16_backward_cpu(const uint16_t* dact, const uint16_t* deriv, uint16_t* dpre, float* colsum, int64_t rows,
                            int64_t cols, int threads) {
  with_column_sums(rows, cols, threads, colsum, [&](int64_t r0, int64_t r1, float* sum) {
#ifdef MVF_AUTOCAST_AVX512
    if (has_avx512()) return gelu_backward_avx512(dact, deriv, dpre, sum, r0, r1, cols);
#endif
    gelu_backward_rows(dact, deriv, dpre, sum, r0, r1, cols);
  });
}

void layer_norm_bf16_backward_cpu(const uint16_t* dy, const float* x, const float* mean, const float* rstd,
                                  const float* gamma, const float* residual, float* dx, float* dgamma, float* dbeta,
                                  int64_t rows, int64_t dim, int threads) {
  std::vector<float> sums(static_cast<size_t>(2 * dim));
  with_column_sums(rows, 2 * dim, threads, sums.data(), [&](int64_t r0, int64_t r1, float* sum) {
    layer_norm_backward_rows(dy, x, mean, rstd, gamma, residual, dx, sum, r0, r1, dim);
  });
  std::copy(sums.begin(), sums.begin() + dim, dgamma);
  std::copy(sums.begin() + dim, sums.end(), dbeta);
}

bool linear_bf16_supported() {
#if defined(MVF_AUTOCAST_AVX512) && MVF_HAVE_BF16_DOT
  return bf16_dot_supported();
#else
  return false;
#endif
}

bool linear_bf16_preferred() { return linear_bf16_supported() && !cpu_has_amx_bf16(); }

void linear_bf16_cpu(const uint16_t* a, const float* w, const float* b, uint16_t* wb, int64_t rows, int64_t K,
                     int64_t N, int epilogue, void* out, uint16_t* deriv, const float* residual, int threads) {
#if defined(MVF_AUTOCAST_AVX512) && MVF_HAVE_BF16_DOT
  if (!linear_bf16_supported() || N <= 0) return;  // K = 0 runs: every sum is 0, y = the bias
  const int64_t np = pad_vec(N), K2 = (K + 1) / 2;
  thread_local std::vector<uint32_t> packed;
  thread_local std::vector<float> bias;
  if (static_cast<int64_t>(packed.size()) < K2 * np) packed.resize(static_cast<size_t>(K2 * np));
  bias.assign(static_cast<size_t>(np), 0.0f);
  for (int64_t j = 0; j < N; ++j) bias[j] = bf16_to_float(float_to_bf16(b[j]));
  uint32_t* pk = packed.data();
  parallel_for(np / 16, 4, threads, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) pack_weight_block(w, N, K, np, 16 * c, wb, pk);
  });
  if (rows <= 0) return;
  const auto run = [&](const auto& epi) {
    const int64_t blocks = (rows + 5) / 6;
    parallel_pieces(blocks, gemm_piece(blocks, 6 * K * np), threads, [&](int64_t, int64_t b0, int64_t b1) {
      linear_rows(a, K, 2, K, pk, np, 6 * b0, std::min(rows, 6 * b1), epi);
    });
  };
  if (epilogue == 1) {
    GeluEpilogue epi;
    epi.bias = bias.data(), epi.N = N, epi.table = gelu_table(), epi.act = static_cast<uint16_t*>(out),
    epi.deriv = deriv;
    run(epi);
  } else if (epilogue == 2) {
    ResidualEpilogue epi;
    epi.bias = bias.data(), epi.N = N, epi.residual = residual, epi.out = static_cast<float*>(out);
    run(epi);
  } else {
    StoreEpilogue epi;
    epi.bias = bias.data(), epi.N = N, epi.out = static_cast<uint16_t*>(out);
    run(epi);
  }
#else
  (void)a, (void)w, (void)b, (void)wb, (void)rows, (void)K, (void)N, (void)epilogue, (void)out, (void)deriv,
      (void)residual, (void)threads;
#endif
}

void linear_bf16_backward_input_cpu(const uint16_t* g, const uint16_t* wb, int64_t rows, int64_t N, int64_t K,
                                    uint16_t* out, bool gelu, const uint16_t* deriv, float* colsum, int threads) {
#if defined(MVF_AUTOCAST_AVX512) && MVF_HAVE_BF16_DOT
  if (!linear_bf16_supported() || K <= 0) return;
  const int64_t np = pad_vec(K), N2 = (N + 1) / 2;
  thread_local std::vector<uint32_t> packed;
  if (static_cast<int64_t>(packed.size()) < N2 * np) packed.resize(static_cast<size_t>(N2 * np));
  uint32_t* pk = packed.data();
  parallel_for(N2, 16, threads, [&](int64_t k0, int64_t k1) { pair_rows_range(wb, N, K, np, k0, k1, pk); });
  const int64_t blocks = (rows + 5) / 6;
  const int64_t piece = gemm_piece(blocks, 6 * std::max<int64_t>(N, 1) * np);
  if (!gelu) {
    if (rows <= 0) return;
    StoreNoBias epi{K, out};
    parallel_pieces(blocks, piece, threads, [&](int64_t, int64_t b0, int64_t b1) {
      linear_rows(g, N, 2, N, pk, np, 6 * b0, std::min(rows, 6 * b1), epi);
    });
    return;
  }
  // With GELU's backward: one partial column sum per piece of row blocks, added in piece order (the
  // same bits for any thread count).
  const int64_t pieces = std::max<int64_t>(1, (blocks + piece - 1) / piece);
  std::vector<float> partial(static_cast<size_t>(pieces * np), 0.0f);
  if (rows > 0) {
    parallel_pieces(blocks, piece, threads, [&](int64_t p, int64_t b0, int64_t b1) {
      GeluBackwardEpilogue epi{K, deriv, out, partial.data() + p * np};
      linear_rows(g, N, 2, N, pk, np, 6 * b0, std::min(rows, 6 * b1), epi);
    });
  }
  add_partials(partial.data(), pieces, np, K, colsum);
#else
  (void)g, (void)wb, (void)rows, (void)N, (void)K, (void)out, (void)gelu, (void)deriv, (void)colsum, (void)threads;
#endif
}

void linear_bf16_backward_weight_cpu(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t N, int64_t K,
                                     float* dw, int threads) {
#if defined(MVF_AUTOCAST_AVX512) && MVF_HAVE_BF16_DOT
  if (!linear_bf16_supported() || N <= 0 || K <= 0) return;
  if (rows <= 0) {
    std::fill(dw, dw + N * K, 0.0f);
    return;
  }
  // Both operands as pairs of rows (row_pairs): the reduction runs over the rows. dw's row n at
  // pair m is then word n of gp's row m: A with a_row 2 elements, a_k one padded gp row. The pairs go
  // in chunks whose packed rows of both (~512 KiB) stay in L2: each chunk is packed (in parallel) just
  // before the threads pass every row block of dw over it (claiming pieces of dw's row blocks), so
  // the packed copies never travel to memory and back.
  const int64_t M2 = (rows + 1) / 2, np = pad_vec(K), npg = pad_vec(N);
  const int64_t chunk = std::min(M2, std::max<int64_t>(16, (128 * 1024) / (np + npg)));
  thread_local std::vector<uint32_t> gp_buf, xp_buf;
  if (static_cast<int64_t>(gp_buf.size()) < chunk * npg) gp_buf.resize(static_cast<size_t>(chunk * npg));
  if (static_cast<int64_t>(xp_buf.size()) < chunk * np) xp_buf.resize(static_cast<size_t>(chunk * np));
  uint32_t* gp = gp_buf.data();
  uint32_t* xp = xp_buf.data();
  const int64_t blocks = (N + 5) / 6;
  const uint16_t* a = reinterpret_cast<const uint16_t*>(gp);
  for (int64_t c0 = 0; c0 < M2; c0 += chunk) {
    const int64_t c1 = std::min(M2, c0 + chunk);
    // Row pairs c0 .. c1 - 1 of g and x, at rows 0 .. of the chunk buffers.
    parallel_for(c1 - c0, 16, threads, [&](int64_t m0, int64_t m1) {
      pair_rows_range(g + 2 * c0 * N, rows - 2 * c0, N, npg, m0, m1, gp);
      pair_rows_range(x + 2 * c0 * K, rows - 2 * c0, K, np, m0, m1, xp);
    });
    WeightGradEpilogue epi{K, dw, c0 == 0, c1 == M2};
    const int64_t piece = gemm_piece(blocks, 6 * np * 2 * (c1 - c0));
    parallel_pieces(blocks, piece, threads, [&](int64_t, int64_t b0, int64_t b1) {
      linear_rows(a, 2, 2 * npg, 2 * (c1 - c0), xp, np, 6 * b0, std::min(N, 6 * b1), epi);
    });
  }
#else
  (void)g, (void)x, (void)rows, (void)N, (void)K, (void)dw, (void)threads;
#endif
}

}  // namespace mvmae_fast
