// Row gather and scatter on the GPU. Rows move in the widest unit (16 down to 1 bytes) that the row
// length and both base pointers allow, so every dtype shares one kernel per unit width. The scatter
// builds the inverse index map for its tile of output rows in shared memory and writes each output
// row once: a copy or zeros. Indices are unique (checked in Python), so no atomics are needed.
#include <cuda_runtime.h>

#include <string>

#include "../common.h"
#include "../ops.h"

namespace mvmae_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kGatherWarps = 4;   // rows per gather block, one warp per row
constexpr int kScatterWarps = 8;
constexpr int kScatterRows = 32;  // output rows per scatter block

struct alignas(16) Bytes16 { uint4 v; };
struct alignas(8) Bytes8 { uint2 v; };

template <class Unit, class Index>
__global__ void gather_rows_kernel(const Unit* __restrict__ x, const Index* __restrict__ ids,
                                   Unit* __restrict__ out, int64_t num_rows, int64_t num_ids,
                                   int64_t total, int64_t units) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.y;
  if (r >= total) return;
  const int64_t b = r / num_ids;
  const int64_t src = static_cast<int64_t>(ids[r]);
  if (src < 0 || src >= num_rows) return;
  const Unit* s = x + (b * num_rows + src) * units;
  Unit* d = out + r * units;
  for (int64_t u = threadIdx.x; u < units; u += kWarp) d[u] = s[u];
}

template <class Unit, class Index>
__global__ void scatter_rows_kernel(const Unit* __restrict__ y, const Index* __restrict__ ids,
                                    Unit* __restrict__ out, int64_t num_rows, int64_t num_ids,
                                    int64_t row_tiles, int64_t units) {
  __shared__ int32_t source[kScatterRows];
  const int64_t b = blockIdx.x / row_tiles;
  const int64_t r0 = (blockIdx.x % row_tiles) * kScatterRows;
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  constexpr int kThreads = kWarp * kScatterWarps;
  for (int t = tid; t < kScatterRows; t += kThreads) source[t] = -1;
  __syncthreads();
  for (int64_t k = tid; k < num_ids; k += kThreads) {
    const int64_t l = static_cast<int64_t>(ids[b * num_ids + k]);
    if (l >= r0 && l < r0 + kScatterRows) source[l - r0] = static_cast<int32_t>(k);
  }
  __syncthreads();
  for (int rr = threadIdx.y; rr < kScatterRows; rr += kScatterWarps) {
    const int64_t l = r0 + rr;
    if (l >= num_rows) break;
    const int32_t k = source[rr];
    Unit* d = out + (b * num_rows + l) * units;
    if (k >= 0) {
      const Unit* s = y + (b * num_ids + k) * units;
      for (int64_t u = threadIdx.x; u < units; u += kWarp) d[u] = s[u];
    } else {
      for (int64_t u = threadIdx.x; u < units; u += kWarp) d[u] = Unit{};
    }
  }
}

int unit_bytes(int64_t row_bytes, const void* a, const void* c) {
  const uintptr_t bits = static_cast<uintptr_t>(row_bytes) | reinterpret_cast<uintptr_t>(a) |
                         reinterpret_cast<uintptr_t>(c);
  for (int w = 16; w > 1; w /= 2)
    if (bits % w == 0) return w;
  return 1;
}

std::string last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <class Unit, class Index>
void launch_gather(const void* x, const void* ids, void* out, int64_t batch, int64_t num_rows,
                   int64_t num_ids, int64_t row_bytes, cudaStream_t stream) {
  const int64_t total = batch * num_ids;
  const dim3 block(kWarp, kGatherWarps);
  const auto grid = static_cast<unsigned>((total + kGatherWarps - 1) / kGatherWarps);
  gather_rows_kernel<Unit, Index><<<grid, block, 0, stream>>>(
      static_cast<const Unit*>(x), static_cast<const Index*>(ids), static_cast<Unit*>(out),
      num_rows, num_ids, total, row_bytes / static_cast<int64_t>(sizeof(Unit)));
}

template <class Unit, class Index>
void launch_scatter(const void* y, const void* ids, void* out, int64_t batch, int64_t num_rows,
                    int64_t num_ids, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_tiles = (num_rows + kScatterRows - 1) / kScatterRows;
  const dim3 block(kWarp, kScatterWarps);
  scatter_rows_kernel<Unit, Index><<<static_cast<unsigned>(batch * row_tiles), block, 0, stream>>>(
      static_cast<const Unit*>(y), static_cast<const Index*>(ids), static_cast<Unit*>(out),
      num_rows, num_ids, row_tiles, row_bytes / static_cast<int64_t>(sizeof(Unit)));
}

// Picks the unit width and index type, then calls Launch<Unit, Index>::run(args...).
template <template <class, class> class Launch, class... Args>
void dispatch(int width, int index_bytes, Args... args) {
  auto with_index = [&](auto unit) {
    using Unit = decltype(unit);
    if (index_bytes == 4)
      Launch<Unit, int32_t>::run(args...);
    else
      Launch<Unit, int64_t>::run(args...);
  };
  switch (width) {
    case 16: with_index(Bytes16{}); break;
    case 8: with_index(Bytes8{}); break;
    case 4: with_index(uint32_t{}); break;
    case 2: with_index(uint16_t{}); break;
    default: with_index(uint8_t{}); break;
  }
}

template <class Unit, class Index>
struct Gather {
  template <class... A>
  static void run(A... a) { launch_gather<Unit, Index>(a...); }
};
template <class Unit, class Index>
struct Scatter {
  template <class... A>
  static void run(A... a) { launch_scatter<Unit, Index>(a...); }
};

}  // namespace

std::string gather_rows_cuda(const void* x, const void* ids, int index_bytes, void* out,
                             int64_t batch, int64_t num_rows, int64_t num_ids, int64_t row_bytes,
                             uintptr_t stream) {
  dispatch<Gather>(unit_bytes(row_bytes, x, out), index_bytes, x, ids, out, batch, num_rows,
                   num_ids, row_bytes, reinterpret_cast<cudaStream_t>(stream));
  return last_error();
}

std::string scatter_rows_cuda(const void* y, const void* ids, int index_bytes, void* out,
                              int64_t batch, int64_t num_rows, int64_t num_ids, int64_t row_bytes,
                              uintptr_t stream) {
  dispatch<Scatter>(unit_bytes(row_bytes, y, out), index_bytes, y, ids, out, batch, num_rows,
                    num_ids, row_bytes, reinterpret_cast<cudaStream_t>(stream));
  return last_error();
}

}  // namespace mvmae_fast
