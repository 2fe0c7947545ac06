#include "torch_mla/layer/chunking.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace torch_mla {
namespace {

std::atomic<int64_t>& budget() {
  static std::atomic<int64_t> elements{kDefaultChunkElements};
  return elements;
}

}  // namespace

int64_t chunk_elements() { return budget().load(std::memory_order_relaxed); }

int64_t set_chunk_elements(int64_t n) {
  TORCH_CHECK_VALUE(n >= 0, "torch_mla._set_chunk_elements: n must be >= 0 (0: the default), got ", n);
  return budget().exchange(n == 0 ? kDefaultChunkElements : n);
}

}  // namespace torch_mla
