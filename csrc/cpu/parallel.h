#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mvmae_fast {

// Splits [0, n) into contiguous chunks run on up to `threads` threads (the caller's thread takes
// one). Chunks are at least `grain` long so small problems stay on one thread. `fn(begin, end)` must
// not throw; workers report errors through their own state.
//
// Built with OpenMP (the default on Linux), the chunks run on the process's OpenMP team. torch's
// wheels ship libgomp.so.1 and load it first, so the extension resolves to the same runtime and runs
// on torch's own intra-op threads: no second set of threads competing with torch's spinning workers
// for the cores. Without OpenMP it falls back to std::thread.
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
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(chunks))
  {
    // The runtime may grant fewer threads than asked for: each takes every team-size-th chunk.
    for (int64_t c = omp_get_thread_num(); c < chunks; c += omp_get_num_threads()) {
      const int64_t begin = c * step;
      const int64_t end = std::min(n, begin + step);
      if (begin < end) fn(begin, end);
    }
  }
#else
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
#endif
}

}  // namespace mvmae_fast
