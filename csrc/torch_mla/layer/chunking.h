#pragma once
// The memory bound of the composed core and of the max-logit fallback (docs/design.md §12.2): each
// materialises (heads × query rows × keys) scores one chunk at a time, at most this many elements.
#include <cstdint>

namespace torch_mla {

// 2^25 elements (128 MiB in float32) unless a test set another budget.
constexpr int64_t kDefaultChunkElements = int64_t{1} << 25;

// The current budget.
int64_t chunk_elements();

// Sets the budget (n > 0; 0 restores the default) and returns the previous one. A test hook
// (torch.ops.torch_mla._set_chunk_elements), so that small calls exercise the chunk loops.
int64_t set_chunk_elements(int64_t n);

}  // namespace torch_mla
