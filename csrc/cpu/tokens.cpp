// MAE's token plumbing around the decoder, on the CPU: the decoder's input from the visible tokens
// (decoder_unshuffle, forward and backward) and the reconstruction loss over the removed patches read
// straight from the image (masked_recon_loss_rows, forward and backward). Each replaces a chain of
// small torch ops (index, where, cat, add / patchify, gather, mean, var, ...) and their autograd
// nodes with one pass. Values are float32 inside; x / pred may be float32, bfloat16 or float16.
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "parallel.h"
#include "simd.h"

namespace mvmae_fast {
namespace {

template <class Index>
int64_t index_at(const void* ids, int64_t i) {
  return static_cast<int64_t>(static_cast<const Index*>(ids)[i]);
}

int64_t load_index(const void* ids, int index_bytes, int64_t i) {
  return index_bytes == 4 ? index_at<int32_t>(ids, i) : index_at<int64_t>(ids, i);
}

// out[b, 0] = x[b, 0] + pos[0]; out[b, 1 + l] = (x[b, 1 + t] if t < K else token) + pos[1 + l].
template <int X>
int unshuffle_forward(const void* x, const void* ids, int index_bytes, const float* token, const float* pos,
                      float* out, int64_t batch, int64_t num_visible, int64_t num_patches, int64_t dim, int threads) {
  std::atomic<int> status{kOk};
  const int64_t K1 = num_visible + 1, L1 = num_patches + 1;
  parallel_for(batch, std::max<int64_t>(1, 4096 / (L1 * dim) + 1), threads, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* o = out + b * L1 * dim;
      const int64_t xb = b * K1 * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = load_as_float<X>(x, xb + d) + pos[d];
      for (int64_t l = 0; l < num_patches; ++l) {
        const int64_t t = load_index(ids, index_bytes, b * num_patches + l);
        if (t < 0 || t >= num_patches) {
          status.store(kIndexOutOfRange);
          return;
        }
        float* row = o + (1 + l) * dim;
        const float* p = pos + (1 + l) * dim;
        if (t < num_visible) {
          const int64_t src = xb + (1 + t) * dim;
          for (int64_t d = 0; d < dim; ++d) row[d] = load_as_float<X>(x, src + d) + p[d];
        } else {
          for (int64_t d = 0; d < dim; ++d) row[d] = token[d] + p[d];
        }
      }
    }
  });
  return status.load();
}

// grad_x[b, 0] = grad[b, 0]; grad_x[b, 1 + t] = grad[b, 1 + l] for t = ids[b, l] < K (rows no index
// reaches stay zero); grad_token = the sum of grad[b, 1 + l] over t >= K, per sample then over the
// batch in order (deterministic for any thread count).
template <int X>
int unshuffle_backward(const float* grad, const void* ids, int index_bytes, void* grad_x, float* grad_token,
                       int64_t batch, int64_t num_visible, int64_t num_patches, int64_t dim, int threads) {
  std::atomic<int> status{kOk};
  const int64_t K1 = num_visible + 1, L1 = num_patches + 1;
  std::vector<float> partial(static_cast<size_t>(batch * dim), 0.0f);
  parallel_for(batch, std::max<int64_t>(1, 4096 / (L1 * dim) + 1), threads, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* g = grad + b * L1 * dim;
      const int64_t xb = b * K1 * dim;
      float* acc = partial.data() + b * dim;
      for (int64_t i = 0; i < K1 * dim; ++i) store_from_float<X>(grad_x, xb + i, 0.0f);
      for (int64_t d = 0; d < dim; ++d) store_from_float<X>(grad_x, xb + d, g[d]);
      for (int64_t l = 0; l < num_patches; ++l) {
        const int64_t t = load_index(ids, index_bytes, b * num_patches + l);
        if (t < 0 || t >= num_patches) {
          status.store(kIndexOutOfRange);
          return;
        }
        const float* row = g + (1 + l) * dim;
        if (t < num_visible) {
          const int64_t dst = xb + (1 + t) * dim;
          for (int64_t d = 0; d < dim; ++d) store_from_float<X>(grad_x, dst + d, row[d]);
        } else {
          for (int64_t d = 0; d < dim; ++d) acc[d] += row[d];
        }
      }
    }
  });
  if (status.load() != kOk) return status.load();
  for (int64_t d = 0; d < dim; ++d) grad_token[d] = 0.0f;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t d = 0; d < dim; ++d) grad_token[d] += partial[b * dim + d];
  return kOk;
}

// The layout of the patches in the image: for value k of a patch (patchify order: row, column,
// channel), its offset from the patch's first pixel, and each patch's first pixel.
struct Patches {
  int64_t views, batch, channels, patch, grid_w, values;  // values = patch * patch * channels
  int64_t stride[5];                                       // of imgs (V, B, C, H, W), in elements
  std::vector<int64_t> offset;

  Patches(int64_t v, int64_t b, int64_t c, int64_t w, int64_t p, const int64_t* s)
      : views(v), batch(b), channels(c), patch(p), grid_w(w / p), values(p * p * c), offset(values) {
    std::memcpy(stride, s, sizeof stride);
    for (int64_t k = 0; k < values; ++k) {
      const int64_t pi = k / (p * c), pj = (k / c) % p, ch = k % c;
      offset[k] = ch * stride[2] + pi * stride[3] + pj * stride[4];
    }
  }
  int64_t start(int64_t n, int64_t l) const {
    const int64_t v = n / batch, b = n % batch;
    return v * stride[0] + b * stride[1] + (l / grid_w) * patch * stride[3] + (l % grid_w) * patch * stride[4];
  }
};

// The target of one patch into t (values floats, padded with zeros to a multiple of 16): the pixels,
// normalised as MAE's norm_pix_loss does ((t - mean) / sqrt(unbiased var + 1e-6)) when norm. The
// sums run in 16 vector lanes (a fixed order, so the result does not depend on the thread count).
MVF_INLINE void patch_target(const float* imgs, const Patches& P, int64_t base, bool norm, float* t) {
  const int64_t n = P.values;
  for (int64_t k = 0; k < n; ++k) t[k] = imgs[base + P.offset[k]];
  if (!norm) return;
  // The mean, refined by the mean of the deviations from it: a constant patch then gets its value
  // back exactly, where a rounded mean leaves 1-ulp deviations that 1 / sqrt(1e-6) scales by 1000.
  float mean = vector_sum(n, [&](int64_t d, int64_t c) { return load_lanes(t + d, c); }) / static_cast<float>(n);
  mean += vector_sum(n, [&](int64_t d, int64_t c) {
    vec16 dev = load_lanes(t + d, c) - mean;
    for (int64_t i = c; i < 16; ++i) dev[i] = 0.0f;
    return dev;
  }) / static_cast<float>(n);
  const float ss = vector_sum(n, [&](int64_t d, int64_t c) {
    vec16 dev = load_lanes(t + d, c) - mean;
    for (int64_t i = c; i < 16; ++i) dev[i] = 0.0f;  // lanes past the patch add nothing
    return dev * dev;
  });
  const float denom = std::sqrt(ss / static_cast<float>(n - 1) + 1.0e-6f);
  for (int64_t k = 0; k < n; ++k) t[k] = (t[k] - mean) / denom;
}

// Runs fn(s, pb, t) for each sample s and each of its rows in order, with t (values floats) that row's
// target patch and pb the row's first element in pred / grad; samples are split between threads, each
// sample's rows run on one. The ids are checked here: an id outside [0, L) stops the work and returns
// kIndexOutOfRange.
template <class Fn>
MVF_INLINE int for_each_target(const float* imgs, const void* ids, int index_bytes, const Patches& P, int64_t rows,
                               bool norm, int threads, const Fn& fn) {
  const int64_t n = P.values, L = P.grid_w * P.grid_w;
  std::atomic<int> status{kOk};
  parallel_for(P.views * P.batch, std::max<int64_t>(1, 8192 / (rows * n) + 1), threads, [&](int64_t n0, int64_t n1) {
    std::vector<float> t(static_cast<size_t>(n));
    for (int64_t s = n0; s < n1; ++s) {
      for (int64_t m = 0; m < rows; ++m) {
        const int64_t l = load_index(ids, index_bytes, s * rows + m);
        if (l < 0 || l >= L) {
          status.store(kIndexOutOfRange);
          return;
        }
        patch_target(imgs, P, P.start(s, l), norm, t.data());
        fn(s, (s * rows + m) * n, t.data());
      }
    }
  });
  return status.load();
}

// sums[v] = sum over view v's samples of the squared errors (per sample in float64, row by row, then
// the samples in order: the same bits for any thread count).
template <int D>
MVF_CPU_CLONES int recon_forward(const void* pred, const float* imgs, const void* ids, int index_bytes, const Patches& P,
                                 int64_t rows, bool norm, double* sums, int threads) {
  const int64_t n = P.values;
  std::vector<double> per_sample(static_cast<size_t>(P.views * P.batch), 0.0);
  const int status = for_each_target(imgs, ids, index_bytes, P, rows, norm, threads, [&](int64_t s, int64_t pb, float* t) {
    for (int64_t k = 0; k < n; ++k) t[k] = load_as_float<D>(pred, pb + k) - t[k];
    per_sample[s] += vector_sum(n, [&](int64_t d, int64_t c) {
      const vec16 v = load_lanes(t + d, c);
      return v * v;
    });
  });
  if (status != kOk) return status;
  for (int64_t v = 0; v < P.views; ++v) {
    double total = 0.0;
    for (int64_t b = 0; b < P.batch; ++b) total += per_sample[v * P.batch + b];
    sums[v] = total;
  }
  return kOk;
}

// grad_pred = scale[v] * 2 * (pred - target), scale[v] = d(loss) / d(loss_v) / (values * B * M).
template <int D>
MVF_CPU_CLONES int recon_backward(const float* scale, const void* pred, const float* imgs, const void* ids,
                                  int index_bytes, const Patches& P, int64_t rows, bool norm, void* grad, int threads) {
  const int64_t n = P.values;
  return for_each_target(imgs, ids, index_bytes, P, rows, norm, threads, [&](int64_t s, int64_t pb, const float* t) {
    const float c = 2.0f * scale[s / P.batch];
    for (int64_t k = 0; k < n; ++k) store_from_float<D>(grad, pb + k, c * (load_as_float<D>(pred, pb + k) - t[k]));
  });
}

}  // namespace

int decoder_unshuffle_forward_cpu(const void* x, int x_dtype, const void* ids, int index_bytes, const float* token,
                                  const float* pos, float* out, int64_t batch, int64_t num_visible,
                                  int64_t num_patches, int64_t dim, int threads) {
  if (x_dtype == kFloat32)
    return unshuffle_forward<kFloat32>(x, ids, index_bytes, token, pos, out, batch, num_visible, num_patches, dim, threads);
  if (x_dtype == kBFloat16)
    return unshuffle_forward<kBFloat16>(x, ids, index_bytes, token, pos, out, batch, num_visible, num_patches, dim, threads);
  return unshuffle_forward<kFloat16>(x, ids, index_bytes, token, pos, out, batch, num_visible, num_patches, dim, threads);
}

int decoder_unshuffle_backward_cpu(const float* grad, const void* ids, int index_bytes, void* grad_x, int x_dtype,
                                   float* grad_token, int64_t batch, int64_t num_visible, int64_t num_patches,
                                   int64_t dim, int threads) {
  if (x_dtype == kFloat32)
    return unshuffle_backward<kFloat32>(grad, ids, index_bytes, grad_x, grad_token, batch, num_visible, num_patches, dim, threads);
  if (x_dtype == kBFloat16)
    return unshuffle_backward<kBFloat16>(grad, ids, index_bytes, grad_x, grad_token, batch, num_visible, num_patches, dim, threads);
  return unshuffle_backward<kFloat16>(grad, ids, index_bytes, grad_x, grad_token, batch, num_visible, num_patches, dim, threads);
}

int recon_rows_forward_cpu(const void* pred, int pred_dtype, const float* imgs, const int64_t* img_strides,
                           const void* ids, int index_bytes, double* sums, int64_t views, int64_t batch,
                           int64_t channels, int64_t width, int64_t patch, int64_t rows, bool norm, int threads) {
  const Patches P(views, batch, channels, width, patch, img_strides);
  if (pred_dtype == kFloat32) return recon_forward<kFloat32>(pred, imgs, ids, index_bytes, P, rows, norm, sums, threads);
  if (pred_dtype == kBFloat16) return recon_forward<kBFloat16>(pred, imgs, ids, index_bytes, P, rows, norm, sums, threads);
  return recon_forward<kFloat16>(pred, imgs, ids, index_bytes, P, rows, norm, sums, threads);
}

int recon_rows_backward_cpu(const float* scale, const void* pred, int pred_dtype, const float* imgs,
                            const int64_t* img_strides, const void* ids, int index_bytes, void* grad, int64_t views,
                            int64_t batch, int64_t channels, int64_t width, int64_t patch, int64_t rows, bool norm,
                            int threads) {
  const Patches P(views, batch, channels, width, patch, img_strides);
  if (pred_dtype == kFloat32)
    return recon_backward<kFloat32>(scale, pred, imgs, ids, index_bytes, P, rows, norm, grad, threads);
  if (pred_dtype == kBFloat16)
    return recon_backward<kBFloat16>(scale, pred, imgs, ids, index_bytes, P, rows, norm, grad, threads);
  return recon_backward<kFloat16>(scale, pred, imgs, ids, index_bytes, P, rows, norm, grad, threads);
}

}  // namespace mvmae_fast
