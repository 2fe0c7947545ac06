#pragma once
// The one sequence list of a call (docs/design.md §3.2): a padded batch is B sequences of length S,
// a packed one is read from cu_seqlens. Every core sees this list and nothing else about sequences.
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "torch_mla/layer/math.h"
#include "torch_mla/layer/checks.h"

namespace torch_mla {

struct Sequences {
  bool packed = false;          // cu_seqlens given
  int64_t count = 0;            // B: sequences in the call
  int64_t padded_len = 0;       // S of a padded batch; 0 when packed
  int64_t tokens = 0;           // T = the sum of the lengths
  int64_t longest = 0;          // the longest sequence: sizes grids and per-sequence buffers
  std::vector<SeqSpan> spans;   // [begin, begin + len) of each sequence in the packed (T, ...) layout
  at::Tensor cu_seqlens;        // packed: (B+1,) int32, contiguous, on q's device; padded: undefined
};

// Builds the list and applies the max_seqlen policy (docs/design.md §3.2): 0 means "not given", a
// positive value must bound every sequence (ValueError otherwise), a negative one is a ValueError.
// Reads cu_seqlens (one small device-to-host copy for CUDA tensors).
Sequences make_sequences(const MlaDims& d, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);

// The checks of max_seqlen that need no data, shared with the Meta kernels: not negative.
void check_max_seqlen_arg(const c10::SymInt& max_seqlen);

}  // namespace torch_mla
