#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace mvmae_fast {

// Splits [0, n) into contiguous chunks run on up to `threads` std::threads (the caller's thread takes
// one). Chunks are at least `grain` long so small problems stay on one thread. `fn(begin, end)` must
// not throw; workers report errors through their own state.
template <class Fn>
void parallel_for(int64_t n, int64_t grain, int threads, const Fn& fn) {
  if (n <= 0) return;
  const int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  const int64_t chunks = std::min<int64_t>(std::max(1, threads), max_chunks);
  if (chunks == 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t begin = c * step;
    const int64_t end = std::min(n, begin + step);
    if (begin >= end) break;
    workers.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(int64_t{0}, std::min(n, step));
  for (auto& w : workers) w.join();
}

}  // namespace mvmae_fast
