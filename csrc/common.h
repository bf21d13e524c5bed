// Shared definitions for the CPU and CUDA sources. No torch headers: every entry point takes raw
// pointers and sizes, validated on the Python side before they get here.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MVF_HD __host__ __device__ __forceinline__
#else
#define MVF_HD inline
#endif

namespace mvmae_fast {

// Status codes returned to the bindings, which turn them into Python exceptions.
enum Status : int {
  kOk = 0,
  kIndexOutOfRange = 1,
  kDuplicateIndex = 2,
};

// "lowbias32" integer hash (C. Wellons): a cheap 32-bit mixer with good avalanche.
MVF_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The random sort key of patch i in sample b. s0/s1 are derived from the user's seed on the host.
// A patch's rank in the order (key, i) is its position in the random permutation; every backend
// (torch reference, C++, CUDA, Triton) computes the same key, so a seed fixes the mask everywhere.
// The key is 63 bits wide so it compares the same as a signed int64 (the torch reference).
MVF_HD uint64_t masking_key(uint32_t s0, uint32_t s1, uint32_t b, uint32_t i) {
  const uint32_t hi = mix32(i ^ mix32(b ^ s0));
  const uint32_t lo = mix32(i ^ mix32(b ^ s1)) >> 1;
  return (static_cast<uint64_t>(hi) << 31) | lo;
}

}  // namespace mvmae_fast
