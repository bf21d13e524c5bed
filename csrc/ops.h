// Entry points of the extension. Pointers are raw device or host addresses; the Python side checks
// device, dtype, contiguity, shapes and (unless told not to) index values before calling.
#pragma once
#include <cstdint>
#include <string>

#include "common.h"

namespace mvmae_fast {

void random_masking_cpu(int64_t* ids_keep, int64_t* ids_restore, float* mask, int64_t batch,
                        int64_t num_patches, int64_t keep, uint32_t s0, uint32_t s1, int threads);

// Row gather/scatter move `row_bytes` bytes per row, so one implementation serves every dtype.
// Indices are int32 (index_bytes == 4) or int64 (index_bytes == 8). Returns a Status code.
int gather_rows_cpu(const void* x, const void* ids, int index_bytes, void* out, int64_t batch,
                    int64_t num_rows, int64_t num_ids, int64_t row_bytes, int threads);
int scatter_rows_cpu(const void* y, const void* ids, int index_bytes, void* out, int64_t batch,
                     int64_t num_rows, int64_t num_ids, int64_t row_bytes, int threads);

// Attention from the fused qkv (B, N, 3 * H * Dh) with row/batch strides in elements (the last dim
// packed); out (B, N, H * Dh), lse (B, H, N) float32, dqkv (B, N, 3 * H * Dh), all contiguous.
// dtype: 0 float32, 1 bfloat16, 2 float16 (CpuDtype in cpu/simd.h).
void attention_forward_cpu(const void* qkv, void* out, float* lse, int dtype, int64_t batch, int64_t seq,
                           int64_t heads, int64_t head_dim, int64_t row_stride, int64_t batch_stride,
                           int threads);
// Whether attention_*_cpu run bfloat16 heads of this head dim on AVX512-BF16 products (cpu/bf16_dot.h)
// rather than in float32: the CPU has them, the head dim is even and MVMAE_FAST_CPU_ISA allows them.
bool attention_bf16_dot(int64_t head_dim);
void attention_backward_cpu(const void* grad_out, const void* qkv, const void* out, const float* lse,
                            void* dqkv, int dtype, int64_t batch, int64_t seq, int64_t heads,
                            int64_t head_dim, int64_t row_stride, int64_t batch_stride, int threads);

// The transformer MLP fc2(gelu(fc1(x))) fused, float32: x (rows, dim), w1 (hidden, dim), b1 (hidden),
// w2 (dim, hidden), b2 (dim), out (rows, dim); all contiguous. hidden_out (rows, hidden), when non-null,
// receives fc1's output (before GELU), which the backward then reads as hidden_in; with hidden_in null
// the backward recomputes fc1 (the same bits). With norm_weight / norm_bias (dim) non-null, fc1 reads LayerNorm(x) (eps;
// mean and rstd (rows) are written, and read back by the backward); with residual, out = x + mlp(...).
// The backward writes dnorm_weight / dnorm_bias when the norm is there.
void mlp_forward_cpu(const float* x, const float* w1, const float* b1, const float* w2, const float* b2,
                     const float* norm_weight, const float* norm_bias, float eps, bool residual, float* out,
                     float* mean, float* rstd, float* hidden_out, int64_t rows, int64_t dim, int64_t hidden,
                     int threads);
void mlp_backward_cpu(const float* grad_out, const float* x, const float* mean, const float* rstd,
                      const float* norm_weight, const float* norm_bias, bool residual, const float* w1, const float* b1,
                      const float* w2, float* dx, float* dw1, float* db1, float* dw2, float* db2, float* dnorm_weight,
                      float* dnorm_bias, const float* hidden_in, int64_t rows, int64_t dim, int64_t hidden,
                      int threads);
// LayerNorm then one Linear, float32: out (rows, out_dim) = LN(x) w^T + b (+ addend), w (out_dim, dim);
// mean and rstd (rows) are written for the backward, which recomputes the normalised rows. A null
// norm_weight means no LayerNorm (norm_bias, mean, rstd unused; no dnorm outputs). The backward adds
// addend (rows x dim, or null) to dx: a residual's gradient.
void norm_linear_forward_cpu(const float* x, const float* norm_weight, const float* norm_bias, float eps,
                             const float* w, const float* b, const float* addend, float* out, float* mean, float* rstd,
                             int64_t rows, int64_t dim, int64_t out_dim, int threads);
void norm_linear_backward_cpu(const float* grad_out, const float* x, const float* mean, const float* rstd,
                              const float* norm_weight, const float* norm_bias, const float* w, const float* addend,
                              float* dx, float* dnorm_weight, float* dnorm_bias, float* dw, float* db, int64_t rows,
                              int64_t dim, int64_t out_dim, int threads);
// The pre-norm block's elementwise work under CPU bfloat16 autocast (cpu/autocast.cpp); bf16 and
// float16 tensors cross as uint16_t. All tensors contiguous, rows x cols (or dim).
void layer_norm_bf16_forward_cpu(const float* x, const float* gamma, const float* beta, float eps, uint16_t* out,
                                 float* mean, float* rstd, int64_t rows, int64_t dim, int threads);
void gelu_bf16_forward_cpu(const uint16_t* pre, uint16_t* act, uint16_t* deriv, int64_t numel, int threads);
void cast_bf16_colsum_cpu(const float* g, uint16_t* out, float* colsum, int64_t rows, int64_t cols, int threads);
void gelu_bf16_backward_cpu(const uint16_t* dact, const uint16_t* deriv, uint16_t* dpre, float* colsum, int64_t rows,
                            int64_t cols, int threads);
// A linear's forward under CPU bfloat16 autocast on AVX512-BF16 (linear_bf16_supported()):
// y = round_bf16(a w^T + round_bf16(b)) as autocast's addmm, a (rows, K) bfloat16, w (N, K) and b (N)
// float32; wb (N, K) receives w rounded to bfloat16 (the backward's operand). epilogue 0: out = y
// (bfloat16); 1: out = gelu(y) (bfloat16) and deriv = gelu'(y) * 2^14 (float16), as
// gelu_bf16_forward; 2: out = residual + y (float32, rows x N).
bool linear_bf16_supported();
// Whether the layers should call them by default: supported and no AMX (whose oneDNN GEMMs are faster).
bool linear_bf16_preferred();
void linear_bf16_cpu(const uint16_t* a, const float* w, const float* b, uint16_t* wb, int64_t rows, int64_t K,
                     int64_t N, int epilogue, void* out, uint16_t* deriv, const float* residual, int threads);
// Its input gradient: out (rows, K) = round_bf16(g wb), g (rows, N) and wb (N, K) bfloat16 (autocast's
// mm); with gelu, GELU's backward on it as gelu_bf16_backward, deriv (rows, K, float16) the forward's:
// out = round_bf16(dact gelu'), colsum (K) the column sums of the unrounded products.
void linear_bf16_backward_input_cpu(const uint16_t* g, const uint16_t* wb, int64_t rows, int64_t N, int64_t K,
                                    uint16_t* out, bool gelu, const uint16_t* deriv, float* colsum, int threads);
// Its weight gradient: dw (N, K) float32 = round_bf16(g^T x), g (rows, N) and x (rows, K) bfloat16, as
// autocast's mm(g.t(), x).float().
void linear_bf16_backward_weight_cpu(const uint16_t* g, const uint16_t* x, int64_t rows, int64_t N, int64_t K,
                                     float* dw, int threads);
void layer_norm_bf16_backward_cpu(const uint16_t* dy, const float* x, const float* mean, const float* rstd,
                                  const float* gamma, const float* residual, float* dx, float* dgamma, float* dbeta,
                                  int64_t rows, int64_t dim, int threads);
void colsum_bf16_cpu(const uint16_t* g, float* colsum, int64_t rows, int64_t cols, int threads);
void add_bf16_cpu(const float* x, const uint16_t* y, float* out, int64_t numel, int threads);
// MAE's decoder input and reconstruction loss (cpu/tokens.cpp). x / grad_x / pred / grad in x_dtype /
// pred_dtype (CpuDtype), everything else float32; ids int32 or int64 (index_bytes), contiguous. The
// unshuffle's token (D) and pos (1 + L, D); out / grad (B, 1 + L, D); x / grad_x (B, 1 + K, D).
// The loss reads imgs (V, B, C, H, W) through img_strides (5, elements): sums (V) are the squared
// errors per view; the backward writes grad = 2 * scale[v] * (pred - target). Return a Status code.
int decoder_unshuffle_forward_cpu(const void* x, int x_dtype, const void* ids, int index_bytes, const float* token,
                                  const float* pos, float* out, int64_t batch, int64_t num_visible,
                                  int64_t num_patches, int64_t dim, int threads);
int decoder_unshuffle_backward_cpu(const float* grad, const void* ids, int index_bytes, void* grad_x, int x_dtype,
                                   float* grad_token, int64_t batch, int64_t num_visible, int64_t num_patches,
                                   int64_t dim, int threads);
int recon_rows_forward_cpu(const void* pred, int pred_dtype, const float* imgs, const int64_t* img_strides,
                           const void* ids, int index_bytes, double* sums, int64_t views, int64_t batch,
                           int64_t channels, int64_t width, int64_t patch, int64_t rows, bool norm, int threads);
int recon_rows_backward_cpu(const float* scale, const void* pred, int pred_dtype, const float* imgs,
                            const int64_t* img_strides, const void* ids, int index_bytes, void* grad, int64_t views,
                            int64_t batch, int64_t channels, int64_t width, int64_t patch, int64_t rows, bool norm,
                            int threads);
// The instruction-set variant the fused layers run: "avx512", "avx2" or "generic".
const char* fused_layers_isa();

#ifdef MVMAE_FAST_WITH_CUDA
// CUDA launchers: enqueue on `stream` and return "" or the CUDA error string.
std::string random_masking_cuda(int64_t* ids_keep, int64_t* ids_restore, float* mask,
                                int64_t batch, int64_t num_patches, int64_t keep, uint32_t s0,
                                uint32_t s1, uintptr_t stream);
std::string gather_rows_cuda(const void* x, const void* ids, int index_bytes, void* out,
                             int64_t batch, int64_t num_rows, int64_t num_ids, int64_t row_bytes,
                             uintptr_t stream);
std::string scatter_rows_cuda(const void* y, const void* ids, int index_bytes, void* out,
                              int64_t batch, int64_t num_rows, int64_t num_ids, int64_t row_bytes,
                              uintptr_t stream);
#endif

}  // namespace mvmae_fast
