// Row gather and its backward, a row scatter that zero-fills the rows no index points at.
// Indices are unique within a sample, so the scatter needs no atomics and writes every output row
// exactly once (a copy or a zero fill) instead of zero-filling first and scattering after.
#include <atomic>
#include <cstring>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "parallel.h"

namespace mvmae_fast {
namespace {

template <class Index>
int gather_impl(const char* x, const Index* ids, char* out, int64_t batch, int64_t num_rows,
                int64_t num_ids, int64_t row_bytes, int threads) {
  std::atomic<int> status{kOk};
  // A second thread only pays off for copies of a few MB: below that, starting the parallel region
  // costs more than the copy.
  const int64_t grain = std::max<int64_t>(1, (int64_t{2} << 20) / row_bytes);
  parallel_for(batch * num_ids, grain, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / num_ids;
      const int64_t src = static_cast<int64_t>(ids[r]);
      if (src < 0 || src >= num_rows) {
        status.store(kIndexOutOfRange);
        return;
      }
      std::memcpy(out + r * row_bytes, x + (b * num_rows + src) * row_bytes, row_bytes);
    }
  });
  return status.load();
}

template <class Index>
int scatter_impl(const char* y, const Index* ids, char* out, int64_t batch, int64_t num_rows,
                 int64_t num_ids, int64_t row_bytes, int threads) {
  // source[b * L + l] = k such that ids[b, k] == l, or -1: the inverse map, built per sample.
  std::vector<int32_t> source(static_cast<size_t>(batch * num_rows), -1);
  std::atomic<int> status{kOk};
  parallel_for(batch, std::max<int64_t>(1, (int64_t{1} << 16) / num_ids), threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int32_t* src_row = source.data() + b * num_rows;
      for (int64_t k = 0; k < num_ids; ++k) {
        const int64_t l = static_cast<int64_t>(ids[b * num_ids + k]);
        if (l < 0 || l >= num_rows) {
          status.store(kIndexOutOfRange);
          return;
        }
        if (src_row[l] >= 0) {
          status.store(kDuplicateIndex);
          return;
        }
        src_row[l] = static_cast<int32_t>(k);
      }
    }
  });
  if (status.load() != kOk) return status.load();
  // A second thread only pays off for copies of a few MB: below that, starting the parallel region
  // costs more than the copy.
  const int64_t grain = std::max<int64_t>(1, (int64_t{2} << 20) / row_bytes);
  parallel_for(batch * num_rows, grain, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t k = source[r];
      char* dst = out + r * row_bytes;
      if (k >= 0) {
        const int64_t b = r / num_rows;
        std::memcpy(dst, y + (b * num_ids + k) * row_bytes, row_bytes);
      } else {
        std::memset(dst, 0, row_bytes);
      }
    }
  });
  return kOk;
}

}  // namespace

int gather_rows_cpu(const void* x, const void* ids, int index_bytes, void* out, int64_t batch,
                    int64_t num_rows, int64_t num_ids, int64_t row_bytes, int threads) {
  const auto* xb = static_cast<const char*>(x);
  auto* ob = static_cast<char*>(out);
  if (index_bytes == 4)
    return gather_impl(xb, static_cast<const int32_t*>(ids), ob, batch, num_rows, num_ids,
                       row_bytes, threads);
  return gather_impl(xb, static_cast<const int64_t*>(ids), ob, batch, num_rows, num_ids, row_bytes,
                     threads);
}

int scatter_rows_cpu(const void* y, const void* ids, int index_bytes, void* out, int64_t batch,
                     int64_t num_rows, int64_t num_ids, int64_t row_bytes, int threads) {
  const auto* yb = static_cast<const char*>(y);
  auto* ob = static_cast<char*>(out);
  if (index_bytes == 4)
    return scatter_impl(yb, static_cast<const int32_t*>(ids), ob, batch, num_rows, num_ids,
                        row_bytes, threads);
  return scatter_impl(yb, static_cast<const int64_t*>(ids), ob, batch, num_rows, num_ids,
                      row_bytes, threads);
}

}  // namespace mvmae_fast
