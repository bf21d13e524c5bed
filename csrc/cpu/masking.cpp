// Random masking on the CPU: per sample, order the patches by their hashed key (see common.h) and
// write the first `keep` of that order, its inverse (a scatter, not a second sort) and the mask.
#include <algorithm>
#include <utility>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "parallel.h"

namespace mvmae_fast {

void random_masking_cpu(int64_t* ids_keep, int64_t* ids_restore, float* mask, int64_t batch,
                        int64_t num_patches, int64_t keep, uint32_t s0, uint32_t s1, int threads) {
  const int64_t L = num_patches;
  parallel_for(batch, std::max<int64_t>(1, (int64_t{1} << 16) / L), threads, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<uint64_t, int64_t>> order(L);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < L; ++i) {
        order[i] = {masking_key(s0, s1, static_cast<uint32_t>(b), static_cast<uint32_t>(i)), i};
      }
      std::sort(order.begin(), order.end());
      int64_t* restore_row = ids_restore + b * L;
      float* mask_row = mask + b * L;
      for (int64_t r = 0; r < L; ++r) {
        const int64_t i = order[r].second;
        if (r < keep) ids_keep[b * keep + r] = i;
        restore_row[i] = r;
        mask_row[i] = r < keep ? 0.0f : 1.0f;
      }
    }
  });
}

}  // namespace mvmae_fast
