#pragma once
// How the `cpu` cores (docs/design.md §10.2, §16.4) spread work over threads: a thread count from the
// work, and workers that take items from a shared counter with the BLAS kept single-threaded.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "torch_mla/cores/cpu/cpu_blas.h"

namespace torch_mla {
namespace cpu {

// The least work (FLOPs) that pays for one more thread. Below 2× this a problem runs on the
// calling thread: an OpenMP team costs more than it saves on small problems, and spins badly when
// the machine's cores are busy with other processes.
constexpr double kMinThreadFlops = 1 << 23;

// min(torch threads, items, flops / kMinThreadFlops), at least 1; 1 inside a parallel region.
inline int64_t threads_for(double flops, int64_t items) {
  if (at::in_parallel_region()) return 1;
  const int64_t by_work = static_cast<int64_t>(flops / kMinThreadFlops);
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), items, by_work}));
}

// Runs worker(take) on `threads` threads (the calling one alone when 1); take() hands out item
// indices 0, 1, ... once each and −1 when none is left.
template <typename Worker>
void run_workers(int64_t threads, int64_t n_items, const Worker& worker) {
  std::atomic<int64_t> next{0};
  auto take = [&]() -> int64_t {
    const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    return i < n_items ? i : -1;
  };
  if (threads <= 1) {
    const SingleThreadedBlas single;
    worker(take);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const SingleThreadedBlas single;
    worker(take);
  });
}

// Runs part(i) once for every i in [0, parts), on up to `parts` threads: which thread runs a part
// does not matter to a caller whose parts write disjoint memory.
template <typename Part>
void run_parts(int64_t parts, const Part& part) {
  if (parts <= 1) {
    const SingleThreadedBlas single;
    if (parts == 1) part(0);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas single;
    for (int64_t i = begin; i < end; ++i) part(i);
  });
}

}  // namespace cpu
}  // namespace torch_mla
