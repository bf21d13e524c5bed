// Random masking on the GPU: one block per sample. Each thread owns a patch i and counts the
// patches ordered before it by (key, index); that count is i's position in the random permutation,
// so ids_restore is written directly and ids_keep by a scatter. Same keys as the CPU path
// (common.h), so a seed gives the same mask on every device.
#include <cuda_runtime.h>

#include <string>

#include "../common.h"
#include "../ops.h"

namespace mvmae_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 1024;

__global__ void random_masking_kernel(int64_t* __restrict__ ids_keep,
                                      int64_t* __restrict__ ids_restore, float* __restrict__ mask,
                                      int64_t num_patches, int64_t keep, uint32_t s0,
                                      uint32_t s1) {
  __shared__ uint64_t tile[kTile];
  const uint32_t b = blockIdx.x;
  const int64_t L = num_patches;
  for (int64_t i0 = 0; i0 < L; i0 += kThreads) {
    const int64_t i = i0 + threadIdx.x;
    const bool active = i < L;
    const uint64_t key_i = active ? masking_key(s0, s1, b, static_cast<uint32_t>(i)) : 0;
    int64_t rank = 0;
    for (int64_t j0 = 0; j0 < L; j0 += kTile) {
      const int64_t n = L - j0 < kTile ? L - j0 : kTile;
      __syncthreads();
      for (int64_t t = threadIdx.x; t < n; t += kThreads)
        tile[t] = masking_key(s0, s1, b, static_cast<uint32_t>(j0 + t));
      __syncthreads();
      if (active) {
        for (int64_t t = 0; t < n; ++t) {
          const uint64_t key_j = tile[t];
          rank += (key_j < key_i) || (key_j == key_i && j0 + t < i);
        }
      }
    }
    if (active) {
      ids_restore[b * L + i] = rank;
      mask[b * L + i] = rank >= keep ? 1.0f : 0.0f;
      if (rank < keep) ids_keep[b * keep + rank] = i;
    }
  }
}

}  // namespace

std::string random_masking_cuda(int64_t* ids_keep, int64_t* ids_restore, float* mask,
                                int64_t batch, int64_t num_patches, int64_t keep, uint32_t s0,
                                uint32_t s1, uintptr_t stream) {
  random_masking_kernel<<<static_cast<unsigned>(batch), kThreads, 0,
                          reinterpret_cast<cudaStream_t>(stream)>>>(ids_keep, ids_restore, mask,
                                                                    num_patches, keep, s0, s1);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace mvmae_fast
