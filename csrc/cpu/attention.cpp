// Non-causal multi-head self-attention on the CPU, straight from the fused qkv projection.
//
// qkv is (B, N, 3, H, Dh) with the last three dims packed (channel c = which * H * Dh + h * Dh + d)
// and row strides given in elements; out is (B, N, H * Dh) contiguous, lse (B, H, N) float32 and
// dqkv has qkv's packed (B, N, 3 * H * Dh) layout, contiguous. One task per (sample, head): the whole
// N x N score matrix of a head lives in a per-thread fp32 scratch (N is 17-257 for MAE's encoders and
// decoders), so every product is one register-blocked micro-GEMM with no softmax rescaling passes.
// The scores are kept transposed (keys down, queries across the vector lanes; see forward_head),
// which makes the softmax statistics vertical vector operations. float16, and bfloat16 on CPUs
// without AVX512-BF16, are converted to float32 on load and rounded once on store. bfloat16 with an
// even head dim on a CPU with AVX512-BF16 takes forward_head_dot / backward_head_dot instead: the
// products on vdpbf16ps (bf16_dot.h), probabilities and dS rounded to bfloat16 for them, as under
// autocast (1.3-1.5x faster per call at MAE's tiny-preset shapes on a Zen 4).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../ops.h"
#include "parallel.h"
#include "bf16_dot.h"
#include "simd.h"

namespace mvmae_fast {
namespace {

struct Shape {
  int64_t batch, seq, heads, head_dim;
  int64_t row_stride, batch_stride;  // of qkv, in elements
  float scale;
  int64_t np() const { return pad_vec(seq); }
  int64_t dp() const { return pad_vec(head_dim); }
  int64_t d2() const { return head_dim / 2; }  // the bfloat16 heads' pairs along a head's dims
  int64_t n2() const { return (seq + 1) / 2; }  // and along its rows
};

// Where row i of a head's rows starts, in elements: part `which` (0 q, 1 k, 2 v) of head h in qkv, or
// head h of a packed (B, N, H * Dh) tensor (out and its gradient).
MVF_INLINE int64_t qkv_row(const Shape& s, int64_t b, int64_t i, int which, int64_t h) {
  return b * s.batch_stride + i * s.row_stride + (which * s.heads + h) * s.head_dim;
}

MVF_INLINE int64_t packed_row(const Shape& s, int64_t b, int64_t i, int64_t h) {
  return (b * s.seq + i) * s.heads * s.head_dim + h * s.head_dim;
}

// The same as row maps i -> start, for load_rows / load_columns.
MVF_INLINE auto qkv_rows(const Shape& s, int64_t b, int which, int64_t h) {
  return [&s, b, which, h](int64_t i) { return qkv_row(s, b, i, which, h); };
}

MVF_INLINE auto packed_rows(const Shape& s, int64_t b, int64_t h) {
  return [&s, b, h](int64_t i) { return packed_row(s, b, i, h); };
}

// dst[0, n) = src[0, n) * mul, n a multiple of kVec: whole unaligned vectors (float32 rows whose
// head_dim fills its vectors, the usual case, skip the per-element conversion loops).
MVF_INLINE void scaled_copy(const float* src, float mul, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; d += kVec) {
    vec16 v;
    std::memcpy(&v, src + d, sizeof v);
    v *= mul;
    std::memcpy(dst + d, &v, sizeof v);
  }
}

// dst (N x dp), row i = the head_dim elements at src + row(i), times mul; zero padded columns.
template <int D, class Row>
MVF_INLINE void load_rows(const void* src, const Shape& s, const Row& row, float mul, float* dst) {
  const int64_t dp = s.dp();
  if (D == kFloat32 && s.head_dim == dp) {  // head_dim a multiple of 16, as in ViTs
    for (int64_t i = 0; i < s.seq; ++i) scaled_copy(static_cast<const float*>(src) + row(i), mul, dst + i * dp, dp);
    return;
  }
  for (int64_t i = 0; i < s.seq; ++i) {
    const int64_t base = row(i);
    for (int64_t d = 0; d < s.head_dim; ++d) dst[i * dp + d] = load_as_float<D>(src, base + d) * mul;
    for (int64_t d = s.head_dim; d < dp; ++d) dst[i * dp + d] = 0.0f;
  }
}

// The same rows transposed: dst (Dh x np), dst[d * np + i] = element d of row i, times mul; zero in
// the padded columns (rows Dh..dp are never read: every product with it stops at Dh). Blocks of 16
// rows x 16 elements are read row by row (contiguous) and transposed in registers: reading the
// columns directly costs one strided load per element.
template <int D, class Row>
MVF_INLINE void load_columns(const void* src, const Shape& s, const Row& row, float mul, float* dst) {
  const int64_t np = s.np(), hd = s.head_dim, N = s.seq;
  for (int64_t i0 = 0; i0 < np; i0 += 16) {
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      const int64_t dw = std::min<int64_t>(16, hd - d0);
      vec16 r[16];
      for (int64_t ii = 0; ii < 16; ++ii) {
        if (D == kFloat32 && dw == 16 && i0 + ii < N) {  // a whole vector straight from the row
          std::memcpy(&r[ii], static_cast<const float*>(src) + row(i0 + ii) + d0, sizeof(vec16));
          r[ii] *= mul;
          continue;
        }
        float v[16] = {};
        if (i0 + ii < N) {
          const int64_t base = row(i0 + ii) + d0;
          if (dw == 16) {
            for (int64_t dd = 0; dd < 16; ++dd) v[dd] = load_as_float<D>(src, base + dd) * mul;
          } else {
            for (int64_t dd = 0; dd < dw; ++dd) v[dd] = load_as_float<D>(src, base + dd) * mul;
          }
        }
        std::memcpy(&r[ii], v, sizeof v);
      }
      transpose16(r);
      for (int64_t dd = 0; dd < dw; ++dd) std::memcpy(dst + (d0 + dd) * np + i0, &r[dd], sizeof(vec16));
    }
  }
}

// Both passes work on the transposed scores S^T = k (scale q)^T: row j is key j, the vector lanes are
// queries. Softmax statistics are then per-lane (vertical) maxima and sums over rows, with no
// horizontal reductions and no ragged tails (the lanes are padded to np; the padded queries score 0
// and are never stored).
// Each head calls ahead.step() once per block of six rows of each of its products (the forward has
// two, the backward five), so the next sample's lines are requested a few at a time over the current
// sample's heads (see Ahead in simd.h). Once between phases, each request was a burst of ~170 lines
// that stalled on the core's line-fill buffers (15% of backward_head).
MVF_INLINE int64_t forward_steps(const Shape& s) { return 2 * gemm_row_blocks(s.seq); }
MVF_INLINE int64_t backward_steps(const Shape& s) { return 5 * gemm_row_blocks(s.seq); }

// Each column c (a query) of the N x np transposed scores pt: mx[c] = its maximum, pt = exp((pt - mx) *
// scale) in place (scale > 0: the maximum of the scaled scores is the scaled maximum), sum[c] = its sum.
MVF_INLINE void softmax_columns(float* pt, int64_t N, int64_t np, float scale, float* mx, float* sum) {
  for (int64_t c = 0; c < np; ++c) {
    mx[c] = -INFINITY;
    sum[c] = 0.0f;
  }
  for (int64_t j = 0; j < N; ++j)
    for (int64_t c = 0; c < np; ++c) mx[c] = mx[c] < pt[j * np + c] ? pt[j * np + c] : mx[c];
  for (int64_t j = 0; j < N; ++j) {
    float* row = pt + j * np;
    for (int64_t c = 0; c < np; ++c) {
      row[c] = exp_nonpositive((row[c] - mx[c]) * scale);
      sum[c] += row[c];
    }
  }
}

template <int D>
MVF_CPU_CLONES void forward_head(const void* qkv, void* out, float* lse, const Shape& s, int64_t b, int64_t h,
                                 float* scratch, Ahead& ahead) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp();
  float* k = scratch;       // N x dp
  float* v = k + N * dp;    // N x dp
  float* o = v + N * dp;    // N x dp: unnormalised output
  float* qt = o + N * dp;   // dp x np: (scale q)^T
  float* pt = qt + dp * np;  // N x np: S^T, then exp(S^T - max)
  float* mx = pt + N * np;  // np: per-query maximum
  float* sum = mx + np;     // np: per-query sum
  load_rows<D>(qkv, s, qkv_rows(s, b, 1, h), 1.0f, k);
  load_rows<D>(qkv, s, qkv_rows(s, b, 2, h), 1.0f, v);
  load_columns<D>(qkv, s, qkv_rows(s, b, 0, h), s.scale, qt);
  gemm(k, dp, qt, np, pt, np, N, s.head_dim, np, &ahead);
  softmax_columns(pt, N, np, 1.0f, mx, sum);  // qt holds the scale already
  gemm<true>(pt, np, v, dp, o, dp, N, N, dp, &ahead);  // o = P v = (P^T)^T v
  float* row_lse = lse + (b * s.heads + h) * N;
  for (int64_t i = 0; i < N; ++i) {
    const float inv = 1.0f / sum[i];
    const int64_t base = packed_row(s, b, i, h);
    if (D == kFloat32 && s.head_dim == dp) scaled_copy(o + i * dp, inv, static_cast<float*>(out) + base, dp);
    else
      for (int64_t d = 0; d < s.head_dim; ++d) store_from_float<D>(out, base + d, o[i * dp + d] * inv);
    row_lse[i] = mx[i] + std::log(sum[i]);
  }
}

template <int D>
MVF_CPU_CLONES void backward_head(const void* grad_out, const void* qkv, const void* out, const float* lse,
                                  void* dqkv, const Shape& s, int64_t b, int64_t h, float* scratch, Ahead& ahead) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp(), hd = s.heads * s.head_dim;
  float* q = scratch;          // N x dp, scaled
  float* k = q + N * dp;       // N x dp
  float* v = k + N * dp;       // N x dp
  float* go = v + N * dp;      // N x dp: dO
  float* g = go + N * dp;      // N x dp: a gradient block
  float* t = g + N * dp;       // dp x np: o^T, then (scale q)^T
  float* got = t + dp * np;    // dp x np: dO^T
  float* pt = got + dp * np;   // N x np: P^T
  float* dst = pt + N * np;    // N x np: dP^T, then dS^T
  float* delta = dst + N * np;  // np: rowsum(dO * o) per query
  float* lsev = delta + np;    // np: lse per query
  const auto packed = packed_rows(s, b, h);
  load_rows<D>(qkv, s, qkv_rows(s, b, 0, h), s.scale, q);
  load_rows<D>(qkv, s, qkv_rows(s, b, 1, h), 1.0f, k);
  load_rows<D>(qkv, s, qkv_rows(s, b, 2, h), 1.0f, v);
  load_rows<D>(grad_out, s, packed, 1.0f, go);
  load_columns<D>(grad_out, s, packed, 1.0f, got);
  load_columns<D>(out, s, packed, 1.0f, t);
  const float* row_lse = lse + (b * s.heads + h) * N;
  for (int64_t c = 0; c < np; ++c) {
    delta[c] = 0.0f;
    lsev[c] = c < N ? row_lse[c] : 0.0f;
  }
  for (int64_t d = 0; d < s.head_dim; ++d)
    for (int64_t c = 0; c < np; ++c) delta[c] += got[d * np + c] * t[d * np + c];
  load_columns<D>(qkv, s, qkv_rows(s, b, 0, h), s.scale, t);
  gemm(k, dp, t, np, pt, np, N, s.head_dim, np, &ahead);  // S^T
  for (int64_t j = 0; j < N; ++j) {
    float* row = pt + j * np;
    for (int64_t c = 0; c < np; ++c) row[c] = exp_nonpositive(std::min(row[c] - lsev[c], 0.0f));
  }
  gemm(v, dp, got, np, dst, np, N, s.head_dim, np, &ahead);  // dP^T = v dO^T
  for (int64_t j = 0; j < N; ++j) {
    float* row = dst + j * np;
    const float* prow = pt + j * np;
    for (int64_t c = 0; c < np; ++c) row[c] = prow[c] * (row[c] - delta[c]);
  }
  auto store = [&](const float* grad, int which, float mul) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t base = (b * N + i) * 3 * hd + which * hd + h * s.head_dim;
      if (D == kFloat32 && s.head_dim == dp) scaled_copy(grad + i * dp, mul, static_cast<float*>(dqkv) + base, dp);
      else
        for (int64_t d = 0; d < s.head_dim; ++d) store_from_float<D>(dqkv, base + d, grad[i * dp + d] * mul);
    }
  };
  gemm<true>(dst, np, k, dp, g, dp, N, N, dp, &ahead);  // dq = scale dS k = scale (dS^T)^T k
  store(g, 0, s.scale);
  gemm(dst, np, q, dp, g, dp, N, N, dp, &ahead);  // dk = dS^T (scale q)
  store(g, 1, 1.0f);
  gemm(pt, np, go, dp, g, dp, N, N, dp, &ahead);  // dv = P^T dO
  store(g, 2, 1.0f);
}

#if MVF_HAVE_BF16_DOT
// bfloat16 inputs on AVX512-BF16 (bf16_dot.h): every product on vdpbf16ps, straight from the
// bfloat16 q, k, v and dO (no float32 copies of them), softmax and its gradient in float32. As in
// the float32 heads, scores are kept transposed (keys down, queries across the lanes). The
// probabilities and the score gradient are rounded to bfloat16 for the products that read them (P v,
// dS k, dS^T q, P^T dO), as autocast's bfloat16 matmuls take bfloat16 operands (the forward rounds
// exp(S - max), before the division by the row sum; autocast rounds the normalised P); q is not
// prescaled (the scale multiplies the float32 scores, and dq and dk on the way out). Head dims must
// be even (pairs).
MVF_INLINE const uint16_t* bf16_ptr(const void* p) { return static_cast<const uint16_t*>(p); }

// Output rows i < N of a head: acc[i * dp + d] * mul (/ divisor[i]) rounded to bfloat16, at base(i).
template <class Base>
MVF_BF16_INLINE void store_rows_bf16(const float* acc, const Shape& s, const Base& base, float mul,
                                     const float* divisor, void* dst) {
  uint16_t* out = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < s.seq; ++i) {
    const float m = divisor ? mul / divisor[i] : mul;
    uint16_t* __restrict o = out + base(i);
    const float* __restrict a = acc + i * s.dp();
    for (int64_t d = 0; d < s.head_dim; ++d) o[d] = float_to_bf16(a[d] * m);
  }
}

MVF_BF16_TARGET void forward_head_dot(const void* qkv, void* out, float* lse, const Shape& s, int64_t b, int64_t h,
                                      float* scratch, Ahead& ahead) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp(), D2 = s.d2(), N2 = s.n2();
  uint32_t* qt = reinterpret_cast<uint32_t*>(scratch);  // D2 x np: q^T, pairs along d
  float* pt = reinterpret_cast<float*>(qt + D2 * np);   // N x np: S^T / scale, then exp
  uint32_t* pp = reinterpret_cast<uint32_t*>(pt + N * np);  // N2 x np: exp(S - max), pairs along keys
  uint32_t* vp = pp + N2 * np;                              // N2 x dp: v, pairs along keys
  float* o = reinterpret_cast<float*>(vp + N2 * dp);        // N x dp: unnormalised output
  float* mx = o + N * dp;                                   // np: per-query maximum of S^T / scale
  float* sum = mx + np;                                     // np
  const uint16_t* x = bf16_ptr(qkv);
  word_columns(x, qkv_rows(s, b, 0, h), N, np, np, s.head_dim, qt);
  dot_gemm(x + qkv_row(s, b, 0, 1, h), s.row_stride, 2, qt, np, pt, np, N, D2, np, &ahead);  // k q^T
  softmax_columns(pt, N, np, s.scale, mx, sum);
  float_row_pairs(pt, N, np, pp);
  row_pairs(x, qkv_rows(s, b, 2, h), N, s.head_dim, dp, vp);
  dot_gemm(reinterpret_cast<const uint16_t*>(pp), 2, 2 * np, vp, dp, o, dp, N, N2, dp, &ahead);  // P v
  store_rows_bf16(o, s, packed_rows(s, b, h), 1.0f, sum, out);
  float* row_lse = lse + (b * s.heads + h) * N;
  for (int64_t i = 0; i < N; ++i) row_lse[i] = mx[i] * s.scale + std::log(sum[i]);
}

MVF_BF16_TARGET void backward_head_dot(const void* grad_out, const void* qkv, const void* out, const float* lse,
                                       void* dqkv, const Shape& s, int64_t b, int64_t h, float* scratch,
                                       Ahead& ahead) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp(), D2 = s.d2(), N2 = s.n2(), hd = s.heads * s.head_dim;
  uint32_t* qt = reinterpret_cast<uint32_t*>(scratch);      // D2 x np: q^T, pairs along d
  uint32_t* got = qt + D2 * np;                             // D2 x np: dO^T, pairs along d
  float* pt = reinterpret_cast<float*>(got + D2 * np);      // N x np: P^T (float32)
  float* dst = pt + N * np;                                 // N x np: dP^T, then dS^T
  uint16_t* rows16 = reinterpret_cast<uint16_t*>(dst + N * np);  // N x np bfloat16: dS^T, then P^T
  uint32_t* sp = reinterpret_cast<uint32_t*>(rows16 + N * np);   // N2 x np: dS, pairs along keys
  uint32_t* pairs = sp + N2 * np;                           // N2 x dp: k, then q, then dO, pairs along rows
  float* g = reinterpret_cast<float*>(pairs + N2 * dp);     // N x dp: a gradient block
  float* delta = g + N * dp;                                // np: rowsum(dO * o) per query
  float* lsev = delta + np;                                 // np
  const uint16_t* x = bf16_ptr(qkv);
  const uint16_t* go = bf16_ptr(grad_out);
  const uint16_t* o = bf16_ptr(out);
  const auto packed = packed_rows(s, b, h);
  const float* row_lse = lse + (b * s.heads + h) * N;
  for (int64_t c = 0; c < np; ++c) {
    lsev[c] = c < N ? row_lse[c] : 0.0f;
    delta[c] = 0.0f;
  }
  // rowsum(dO * o) in 16 partial sums per row (vector_sum): as one float chain it held up the whole
  // call (the backward took 1.36x as long at the tiny encoder's N 17, Dh 64, 1.11x at its decoder's).
  for (int64_t i = 0; i < N; ++i) {
    const uint16_t* __restrict gr = go + packed(i);
    const uint16_t* __restrict orow = o + packed(i);
    delta[i] = vector_sum(s.head_dim, [&](int64_t d, int64_t count) MVF_LAMBDA_INLINE {
      float prod[16] = {};
      for (int64_t k = 0; k < count; ++k) prod[k] = bf16_to_float(gr[d + k]) * bf16_to_float(orow[d + k]);
      vec16 v;
      std::memcpy(&v, prod, sizeof v);
      return v;
    });
  }
  word_columns(x, qkv_rows(s, b, 0, h), N, np, np, s.head_dim, qt);
  word_columns(go, packed, N, np, np, s.head_dim, got);
  dot_gemm(x + qkv_row(s, b, 0, 1, h), s.row_stride, 2, qt, np, pt, np, N, D2, np, &ahead);  // k q^T
  for (int64_t j = 0; j < N; ++j) {
    float* row = pt + j * np;
    for (int64_t c = 0; c < np; ++c)
      row[c] = c < N ? exp_nonpositive(std::min(row[c] * s.scale - lsev[c], 0.0f)) : 0.0f;  // padded queries: 0
  }
  dot_gemm(x + qkv_row(s, b, 0, 2, h), s.row_stride, 2, got, np, dst, np, N, D2, np, &ahead);  // dP^T = v dO^T
  for (int64_t j = 0; j < N; ++j) {
    float* row = dst + j * np;
    const float* prow = pt + j * np;
    for (int64_t c = 0; c < np; ++c) row[c] = prow[c] * (row[c] - delta[c]);
  }
  auto grad_rows = [&](int which) {
    return [&s, b, h, N, hd, which](int64_t i) { return (b * N + i) * 3 * hd + which * hd + h * s.head_dim; };
  };
  // dq = scale dS k: dS pairs along keys (from dS^T's rows) times k's rows in pairs.
  float_row_pairs(dst, N, np, sp);
  row_pairs(x, qkv_rows(s, b, 1, h), N, s.head_dim, dp, pairs);
  dot_gemm(reinterpret_cast<const uint16_t*>(sp), 2, 2 * np, pairs, dp, g, dp, N, N2, dp, &ahead);
  store_rows_bf16(g, s, grad_rows(0), s.scale, nullptr, dqkv);
  // dk = scale dS^T q: dS^T's bfloat16 rows (pairs along queries) times q's rows in pairs.
  round_to_bf16(dst, N * np, rows16);
  row_pairs(x, qkv_rows(s, b, 0, h), N, s.head_dim, dp, pairs);
  dot_gemm(rows16, np, 2, pairs, dp, g, dp, N, N2, dp, &ahead);
  store_rows_bf16(g, s, grad_rows(1), s.scale, nullptr, dqkv);
  // dv = P^T dO.
  round_to_bf16(pt, N * np, rows16);
  row_pairs(go, packed, N, s.head_dim, dp, pairs);
  dot_gemm(rows16, np, 2, pairs, dp, g, dp, N, N2, dp, &ahead);
  store_rows_bf16(g, s, grad_rows(2), 1.0f, nullptr, dqkv);
}

// Floats of scratch the bfloat16 heads need (the backward's, the larger).
int64_t dot_scratch_floats(const Shape& s) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp(), N2 = s.n2();
  return 2 * s.d2() * np + 2 * N * np + (N * np + 1) / 2 + N2 * np + N2 * dp + N * dp + 2 * np;
}
#endif  // MVF_HAVE_BF16_DOT

bool use_bf16_dot(int dtype, int64_t head_dim) {
  return dtype == kBFloat16 && head_dim % 2 == 0 && bf16_dot_supported();
}

int64_t head_flops(const Shape& s) { return std::max<int64_t>(1, s.seq * s.seq * s.head_dim); }

// Each thread needs this many floats of scratch (the backward's, which is the larger), for the float32
// heads or (dot) the bfloat16 ones.
int64_t scratch_floats(const Shape& s, bool dot) {
#if MVF_HAVE_BF16_DOT
  if (dot) return dot_scratch_floats(s);
#endif
  (void)dot;
  const int64_t N = s.seq, np = s.np(), dp = s.dp();
  return 5 * N * dp + 2 * dp * np + 2 * N * np + 2 * np;
}

// head(b, h, scratch, ahead) for every (sample, head), in parallel, each thread with scratch_size floats of
// scratch. A head makes `steps` ahead.step()s;
// next_sample(b, ahead) adds sample b's lines, which are requested over the heads of the sample before
// it when the same thread computes both.
//
// The tasks t = b * heads + h are split into one contiguous range per thread (the rows the fused
// layers before and after give the same thread, so they are in its caches); each thread works
// through its range from the front, and a thread that finishes first takes the other ranges' last
// tasks, one at a time, from the back. (Static ranges alone left one thread idle for 6-10% of every
// call; handing out blocks first-come lost the cache affinity and was 1% slower on the whole step.)
// A range is one 64-bit word, front and back, changed by compare-and-swap. Every head's outputs
// depend on its inputs only, so the results are the same whatever the schedule.
template <class Head, class Next>
void for_each_head(const Shape& s, int threads, int64_t steps, int64_t scratch_size, const Next& next_sample,
                   const Head& head) {
  const int64_t H = s.heads, tasks = s.batch * H;
  // ~256k multiply-adds per range before another thread is worth waking.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / head_flops(s));
  struct alignas(64) Range {
    std::atomic<uint64_t> bounds;  // front in the low 32 bits, back (one past the last) in the high
  };
  // Task indices are kept relative to `base` in 32 bits: more tasks than fit run in spans.
  constexpr int64_t kSpan = (int64_t{1} << 32) - 1;
  for (int64_t base = 0; base < tasks; base += kSpan) {
    const int64_t count = std::min(kSpan, tasks - base);
    const int64_t workers = std::min<int64_t>(std::max(1, threads), std::max<int64_t>(1, count / grain));
    std::vector<Range> ranges(static_cast<size_t>(workers));
    for (int64_t w = 0; w < workers; ++w) {
      const auto front = static_cast<uint64_t>(count * w / workers), back = static_cast<uint64_t>(count * (w + 1) / workers);
      ranges[w].bounds.store(front | back << 32, std::memory_order_relaxed);
    }
    // The task at range r's front (from_back false) or back, or -1 when the range is used up.
    const auto take = [&](int64_t r, bool from_back) -> int64_t {
      std::atomic<uint64_t>& bounds = ranges[r].bounds;
      uint64_t old = bounds.load(std::memory_order_relaxed);
      for (;;) {
        const uint64_t front = old & 0xffffffffu, back = old >> 32;
        if (front >= back) return -1;
        const uint64_t next = from_back ? front | (back - 1) << 32 : (front + 1) | back << 32;
        if (bounds.compare_exchange_weak(old, next, std::memory_order_relaxed))
          return base + static_cast<int64_t>(from_back ? back - 1 : front);
      }
    };
    // One past the last task range r still holds (the ones after it are done or being done elsewhere).
    const auto end_of = [&](int64_t r) {
      return base + static_cast<int64_t>(ranges[r].bounds.load(std::memory_order_relaxed) >> 32);
    };
    parallel_for(workers, 1, static_cast<int>(workers), [&](int64_t w, int64_t) {
      std::vector<float> scratch(static_cast<size_t>(scratch_size));
      Ahead ahead;
      bool first = true;
      for (int64_t t = take(w, false); t >= 0; t = take(w, false), first = false) {
        const int64_t b = t / H, h = t % H;
        // Starting a sample: its successor's lines, if it is still in this thread's range (another
        // thread may yet take it: the prefetch is then wasted, not wrong), over this sample's heads.
        if (h == 0 || first) {
          ahead = Ahead{};
          if ((b + 1) * H < end_of(w)) next_sample(b + 1, ahead);
          ahead.pace((H - h) * steps);
        }
        head(b, h, scratch.data(), ahead);
      }
      // Own range done: the others' last tasks.
      Ahead none;
      for (int64_t r = (w + 1) % workers; r != w; r = (r + 1) % workers)
        for (int64_t t = take(r, true); t >= 0; t = take(r, true)) head(t / H, t % H, scratch.data(), none);
    });
  }
}

MVF_INLINE int64_t element_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Sample b's span of qkv (all heads' q, k and v rows) and of a packed (B, N, H * Dh) tensor, for
// prefetching. A head's rows are short runs at a wide stride (64 floats every 3 * H * Dh), which
// the hardware prefetchers do not follow.
MVF_INLINE void add_qkv(Ahead& ahead, const void* qkv, const Shape& s, int64_t b, int64_t esize) {
  const int64_t first = qkv_row(s, b, 0, 0, 0), last = qkv_row(s, b, s.seq - 1, 2, s.heads - 1) + s.head_dim;
  ahead.add(static_cast<const char*>(qkv) + first * esize, (last - first) * esize);
}

MVF_INLINE void add_packed(Ahead& ahead, const void* t, const Shape& s, int64_t b, int64_t width, int64_t esize) {
  ahead.add(static_cast<const char*>(t) + b * s.seq * width * esize, s.seq * width * esize);
}

Shape make_shape(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t row_stride,
                 int64_t batch_stride) {
  return Shape{batch, seq, heads, head_dim, row_stride, batch_stride, 1.0f / std::sqrt(static_cast<float>(head_dim))};
}

}  // namespace

bool bf16_dot_supported() { return MVF_HAVE_BF16_DOT && cpu_isa() >= kIsaAvx512Bf16; }

bool attention_bf16_dot(int64_t head_dim) { return use_bf16_dot(kBFloat16, head_dim); }

void attention_forward_cpu(const void* qkv, void* out, float* lse, int dtype, int64_t batch, int64_t seq,
                           int64_t heads, int64_t head_dim, int64_t row_stride, int64_t batch_stride,
                           int threads) {
  const Shape s = make_shape(batch, seq, heads, head_dim, row_stride, batch_stride);
  const int64_t esize = element_bytes(dtype), hd = heads * head_dim;
  const auto next_sample = [&](int64_t b, Ahead& ahead) {
    add_qkv(ahead, qkv, s, b, esize);
    add_packed(ahead, out, s, b, hd, esize);
  };
  [[maybe_unused]] const bool dot = use_bf16_dot(dtype, head_dim);
  const auto head = [&](int64_t b, int64_t h, float* scratch, Ahead& ahead) {
#if MVF_HAVE_BF16_DOT
    if (dot) return forward_head_dot(qkv, out, lse, s, b, h, scratch, ahead);
#endif
    if (dtype == kFloat32) forward_head<kFloat32>(qkv, out, lse, s, b, h, scratch, ahead);
    else if (dtype == kBFloat16) forward_head<kBFloat16>(qkv, out, lse, s, b, h, scratch, ahead);
    else forward_head<kFloat16>(qkv, out, lse, s, b, h, scratch, ahead);
  };
  for_each_head(s, threads, forward_steps(s), scratch_floats(s, dot), next_sample, head);
}

void attention_backward_cpu(const void* grad_out, const void* qkv, const void* out, const float* lse,
                            void* dqkv, int dtype, int64_t batch, int64_t seq, int64_t heads,
                            int64_t head_dim, int64_t row_stride, int64_t batch_stride, int threads) {
  const Shape s = make_shape(batch, seq, heads, head_dim, row_stride, batch_stride);
  const int64_t esize = element_bytes(dtype), hd = heads * head_dim;
  const auto next_sample = [&](int64_t b, Ahead& ahead) {
    add_qkv(ahead, qkv, s, b, esize);
    add_packed(ahead, grad_out, s, b, hd, esize);
    add_packed(ahead, out, s, b, hd, esize);
    add_packed(ahead, dqkv, s, b, 3 * hd, esize);
  };
  [[maybe_unused]] const bool dot = use_bf16_dot(dtype, head_dim);
  const auto head = [&](int64_t b, int64_t h, float* scratch, Ahead& ahead) {
#if MVF_HAVE_BF16_DOT
    if (dot) return backward_head_dot(grad_out, qkv, out, lse, dqkv, s, b, h, scratch, ahead);
#endif
    if (dtype == kFloat32) backward_head<kFloat32>(grad_out, qkv, out, lse, dqkv, s, b, h, scratch, ahead);
    else if (dtype == kBFloat16) backward_head<kBFloat16>(grad_out, qkv, out, lse, dqkv, s, b, h, scratch, ahead);
    else backward_head<kFloat16>(grad_out, qkv, out, lse, dqkv, s, b, h, scratch, ahead);
  };
  for_each_head(s, threads, backward_steps(s), scratch_floats(s, dot), next_sample, head);
}

}  // namespace mvmae_fast
