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
void attention_backward_cpu(const void* grad_out, const void* qkv, const void* out, const float* lse,
                            void* dqkv, int dtype, int64_t batch, int64_t seq, int64_t heads,
                            int64_t head_dim, int64_t row_stride, int64_t batch_stride, int threads);

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
