#pragma once
#include <algorithm>
#include <atomic>
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

// Splits [0, n) into pieces of `piece` items (the last may be shorter), fn(p, begin, end) for piece p,
// on up to `threads` threads. Each thread first takes the pieces of its own contiguous share, as
// parallel_for would (so a thread keeps the same rows from call to call), then takes what is left of
// the others' shares: a thread that runs ahead (warmer caches, a less contended core; on a shared
// virtual CPU one of two threads is often 5-10% slower for a while) finishes the work of one that
// lags, where parallel_for waits for it. Which thread runs a piece varies from run to run, so fn must
// not depend on it; results kept per piece (partial sums) depend only on n and piece, not on the thread
// count or the timing.
template <class Fn>
void parallel_pieces(int64_t n, int64_t piece, int threads, const Fn& fn) {
  if (n <= 0) return;
  piece = std::max<int64_t>(1, piece);
  const int64_t pieces = (n + piece - 1) / piece;
  const int team = static_cast<int>(std::min<int64_t>(std::max(1, threads), pieces));
  const auto run = [&](int64_t p) { fn(p, p * piece, std::min(n, (p + 1) * piece)); };
  if (team == 1) {
    for (int64_t p = 0; p < pieces; ++p) run(p);
    return;
  }
  // Share t: pieces [pieces * t / team, pieces * (t + 1) / team), next[t] its next unclaimed piece.
  struct alignas(64) Next {
    std::atomic<int64_t> value;
  };
  std::vector<Next> next(static_cast<size_t>(team));
  for (int t = 0; t < team; ++t) next[t].value.store(pieces * t / team, std::memory_order_relaxed);
  const auto work = [&](int self) {
    for (int i = 0; i < team; ++i) {
      const int t = (self + i) % team;
      const int64_t end = pieces * (t + 1) / team;
      for (int64_t p = next[t].value.fetch_add(1, std::memory_order_relaxed); p < end;
           p = next[t].value.fetch_add(1, std::memory_order_relaxed))
        run(p);
    }
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
  {
    // The runtime may grant fewer threads than asked for: the shares of the missing ones are taken.
    work(omp_get_thread_num());
  }
#else
  std::vector<std::thread> workers;
  workers.reserve(team - 1);
  for (int t = 1; t < team; ++t) workers.emplace_back(work, t);
  work(0);
  for (auto& w : workers) w.join();
#endif
}

}  // namespace mvmae_fast
