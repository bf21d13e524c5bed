// Non-causal multi-head self-attention on the CPU, straight from the fused qkv projection.
//
// qkv is (B, N, 3, H, Dh) with the last three dims packed (channel c = which * H * Dh + h * Dh + d)
// and row strides given in elements; out is (B, N, H * Dh) contiguous, lse (B, H, N) float32 and
// dqkv has qkv's packed (B, N, 3 * H * Dh) layout, contiguous. One task per (sample, head): the whole
// N x N score matrix of a head lives in a per-thread fp32 scratch (N is 17-257 for MAE's encoders and
// decoders), so every product is one register-blocked micro-GEMM with no softmax rescaling passes.
// bfloat16 and float16 are converted to float32 on load and rounded once on store.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "parallel.h"
#include "simd.h"

namespace mvmae_fast {
namespace {

struct Shape {
  int64_t batch, seq, heads, head_dim;
  int64_t row_stride, batch_stride;  // of qkv, in elements
  float scale;
  int64_t np() const { return pad_vec(seq); }
  int64_t dp() const { return pad_vec(head_dim); }
};

// Row i of head h, part `which` (0 q, 1 k, 2 v) of sample b, as float into dst[0, dp) (zero padded),
// times `mul`.
template <int D>
MVF_INLINE void load_row(const void* qkv, const Shape& s, int64_t b, int64_t i, int which, int64_t h,
                         float mul, float* dst) {
  const int64_t base = b * s.batch_stride + i * s.row_stride + (which * s.heads + h) * s.head_dim;
  for (int64_t d = 0; d < s.head_dim; ++d) dst[d] = load_as_float<D>(qkv, base + d) * mul;
  for (int64_t d = s.head_dim; d < s.dp(); ++d) dst[d] = 0.0f;
}

// dst (N x dp): rows of a packed (B, N, H * Dh) tensor for head h of sample b.
template <int D>
MVF_INLINE void load_heads(const void* x, const Shape& s, int64_t b, int64_t h, float* dst) {
  const int64_t dp = s.dp();
  for (int64_t i = 0; i < s.seq; ++i) {
    const int64_t base = (b * s.seq + i) * s.heads * s.head_dim + h * s.head_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) dst[i * dp + d] = load_as_float<D>(x, base + d);
    for (int64_t d = s.head_dim; d < dp; ++d) dst[i * dp + d] = 0.0f;
  }
}

// dst (Dh x np): part `which` of head h of sample b, transposed (dst[d * np + i] = row i, element d),
// zero in the padded columns.
template <int D>
MVF_INLINE void load_transposed(const void* qkv, const Shape& s, int64_t b, int which, int64_t h, float* dst) {
  const int64_t np = s.np();
  for (int64_t i = 0; i < s.seq; ++i) {
    const int64_t base = b * s.batch_stride + i * s.row_stride + (which * s.heads + h) * s.head_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) dst[d * np + i] = load_as_float<D>(qkv, base + d);
  }
  for (int64_t d = 0; d < s.head_dim; ++d)
    for (int64_t i = s.seq; i < np; ++i) dst[d * np + i] = 0.0f;
}

// S = (scale q) k^T into sbuf (N x np); the padded columns come out 0.
MVF_INLINE void scores(const Shape& s, const float* q, const float* kt, float* sbuf) {
  gemm(q, s.dp(), kt, s.np(), sbuf, s.np(), s.seq, s.head_dim, s.np());
}

template <int D>
MVF_CPU_CLONES void forward_head(const void* qkv, void* out, float* lse, const Shape& s, int64_t b, int64_t h,
                                 float* scratch) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp();
  float* q = scratch;            // N x dp, scaled
  float* v = q + N * dp;         // N x dp
  float* kt = v + N * dp;        // dp x np
  float* p = kt + dp * np;       // N x np
  float* o = p + N * np;         // N x dp
  for (int64_t i = 0; i < N; ++i) {
    load_row<D>(qkv, s, b, i, 0, h, s.scale, q + i * dp);
    load_row<D>(qkv, s, b, i, 2, h, 1.0f, v + i * dp);
  }
  load_transposed<D>(qkv, s, b, 1, h, kt);
  scores(s, q, kt, p);
  for (int64_t i = 0; i < N; ++i) {
    float* row = p + i * np;
    const float m = lane_max(row, N);
    for (int64_t j = 0; j < N; ++j) row[j] = exp_nonpositive(row[j] - m);
    const float sum = lane_sum(row, N);
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < N; ++j) row[j] *= inv;
    lse[(b * s.heads + h) * N + i] = m + std::log(sum);
  }
  gemm(p, np, v, dp, o, dp, N, N, dp);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = (b * N + i) * s.heads * s.head_dim + h * s.head_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) store_from_float<D>(out, base + d, o[i * dp + d]);
  }
}

template <int D>
MVF_CPU_CLONES void backward_head(const void* grad_out, const void* qkv, const void* out, const float* lse,
                                  void* dqkv, const Shape& s, int64_t b, int64_t h, float* scratch) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp(), hd = s.heads * s.head_dim;
  float* q = scratch;         // N x dp, scaled
  float* k = q + N * dp;      // N x dp
  float* go = k + N * dp;     // N x dp
  float* t = go + N * dp;     // dp x np: k^T, then v^T
  float* p = t + dp * np;     // N x np: probabilities
  float* ds = p + N * np;     // N x np: dP, then dS
  float* g = ds + N * np;     // N x dp: a gradient block
  float* delta = g + N * dp;  // N
  load_heads<D>(grad_out, s, b, h, go);
  load_heads<D>(out, s, b, h, g);  // o, only needed for delta
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t d = 0; d < dp; ++d) g[i * dp + d] *= go[i * dp + d];
    delta[i] = lane_sum(g + i * dp, dp);
    load_row<D>(qkv, s, b, i, 0, h, s.scale, q + i * dp);
    load_row<D>(qkv, s, b, i, 1, h, 1.0f, k + i * dp);
  }
  load_transposed<D>(qkv, s, b, 1, h, t);
  scores(s, q, t, p);
  const float* row_lse = lse + (b * s.heads + h) * N;
  for (int64_t i = 0; i < N; ++i) {
    float* row = p + i * np;
    const float l = row_lse[i];
    for (int64_t j = 0; j < N; ++j) row[j] = exp_nonpositive(std::min(row[j] - l, 0.0f));
  }
  load_transposed<D>(qkv, s, b, 2, h, t);
  gemm(go, dp, t, np, ds, np, N, s.head_dim, np);  // dP = dO v^T
  for (int64_t i = 0; i < N; ++i) {
    float* row = ds + i * np;
    const float* prow = p + i * np;
    const float di = delta[i];
    for (int64_t j = 0; j < N; ++j) row[j] = prow[j] * (row[j] - di);
  }
  auto store = [&](const float* grad, int which, float mul) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t base = (b * N + i) * 3 * hd + which * hd + h * s.head_dim;
      for (int64_t d = 0; d < s.head_dim; ++d) store_from_float<D>(dqkv, base + d, grad[i * dp + d] * mul);
    }
  };
  gemm(ds, np, k, dp, g, dp, N, N, dp);  // dq = scale dS k
  store(g, 0, s.scale);
  gemm<true>(ds, np, q, dp, g, dp, N, N, dp);  // dk = dS^T (scale q)
  store(g, 1, 1.0f);
  gemm<true>(p, np, go, dp, g, dp, N, N, dp);  // dv = P^T dO
  store(g, 2, 1.0f);
}

int64_t head_flops(const Shape& s) { return std::max<int64_t>(1, s.seq * s.seq * s.head_dim); }

// Each thread needs this many floats of scratch (the backward's, which is the larger).
int64_t scratch_floats(const Shape& s) {
  const int64_t N = s.seq, np = s.np(), dp = s.dp();
  return 4 * N * dp + dp * np + 2 * N * np + N;
}

template <class Fn>
void for_each_head(const Shape& s, int threads, const Fn& fn) {
  // ~256k multiply-adds per chunk before another thread is worth waking.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / head_flops(s));
  parallel_for(s.batch * s.heads, grain, threads, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats(s)));
    for (int64_t t = begin; t < end; ++t) fn(t / s.heads, t % s.heads, scratch.data());
  });
}

Shape make_shape(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t row_stride,
                 int64_t batch_stride) {
  return Shape{batch, seq, heads, head_dim, row_stride, batch_stride, 1.0f / std::sqrt(static_cast<float>(head_dim))};
}

}  // namespace

void attention_forward_cpu(const void* qkv, void* out, float* lse, int dtype, int64_t batch, int64_t seq,
                           int64_t heads, int64_t head_dim, int64_t row_stride, int64_t batch_stride,
                           int threads) {
  const Shape s = make_shape(batch, seq, heads, head_dim, row_stride, batch_stride);
  for_each_head(s, threads, [&](int64_t b, int64_t h, float* scratch) {
    if (dtype == kFloat32) forward_head<kFloat32>(qkv, out, lse, s, b, h, scratch);
    else if (dtype == kBFloat16) forward_head<kBFloat16>(qkv, out, lse, s, b, h, scratch);
    else forward_head<kFloat16>(qkv, out, lse, s, b, h, scratch);
  });
}

void attention_backward_cpu(const void* grad_out, const void* qkv, const void* out, const float* lse,
                            void* dqkv, int dtype, int64_t batch, int64_t seq, int64_t heads,
                            int64_t head_dim, int64_t row_stride, int64_t batch_stride, int threads) {
  const Shape s = make_shape(batch, seq, heads, head_dim, row_stride, batch_stride);
  for_each_head(s, threads, [&](int64_t b, int64_t h, float* scratch) {
    if (dtype == kFloat32) backward_head<kFloat32>(grad_out, qkv, out, lse, dqkv, s, b, h, scratch);
    else if (dtype == kBFloat16) backward_head<kBFloat16>(grad_out, qkv, out, lse, dqkv, s, b, h, scratch);
    else backward_head<kFloat16>(grad_out, qkv, out, lse, dqkv, s, b, h, scratch);
  });
}

}  // namespace mvmae_fast
