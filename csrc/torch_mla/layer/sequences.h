#pragma once
// The one sequence list of a call (docs/design.md §3.2): a padded batch is B sequences of length S,
// a packed one is read from cu_seqlens. Every core sees this list and nothing else about sequences.
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "torch_mla/layer/math.h"
#include "torch_mla/layer/checks.h"

namespace torch_mla {

struct Sequences {
  bool packed = false;          // cu_seqlens given
  int64_t count = 0;            // B: sequences in the call
  int64_t padded_len = 0;       // S of a padded batch; 0 when packed
  int64_t tokens = 0;           // T = the sum of the lengths
  int64_t longest = 0;          // the longest sequence, or the caller's bound: sizes grids and buffers
  // [begin, begin + len) of each sequence in the packed (T, ...) layout. Packed calls fill it only
  // when cu_seqlens was read on the host (has_spans()); cores that need it say so (cores/table.h).
  std::vector<SeqSpan> spans;
  at::Tensor cu_seqlens;        // packed: (B+1,) int32, contiguous, on q's device; padded: undefined

  bool has_spans() const { return static_cast<int64_t>(spans.size()) == count; }
};

// Builds the list and applies the max_seqlen policy (docs/design.md §3.2): 0 means "not given", a
// positive value must bound every sequence (ValueError otherwise), a negative one is a ValueError.
// A packed call reads cu_seqlens on the host (read_on_host: a device sync on CUDA) and checks
// its values when `host_spans` is asked for or max_seqlen is not given; otherwise it reads no
// tensor data: longest = max_seqlen, no spans, and the values are the caller's promise.
Sequences make_sequences(const MlaDims& d, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                         bool host_spans);

// The longest sequence of a packed call, from one read of cu_seqlens, its values checked
// (check_cu_seqlens_values): what the autograd layer passes on as max_seqlen when the caller gave
// none, so that forward and backward read cu_seqlens once between them.
int64_t learn_max_seqlen(const at::Tensor& cu_seqlens, int64_t tokens);

// The max_seqlen the autograd layer passes down and saves for the backward: the caller's, or for
// a packed call without one on a core that reads cu_seqlens only on the device (cores/table.h),
// the longest sequence from learn_max_seqlen, the one documented sync of such a call. Tensors
// that hold no data here (fake, functional, meta) and symbolic values keep the caller's.
c10::SymInt known_max_seqlen(const std::optional<at::Tensor>& cu_seqlens, const c10::SymInt& tokens,
                             c10::SymInt max_seqlen, const std::string& core);

// `t` copied to the host (a device sync on CUDA): the one place the ops read tensor data on the
// host, counted. Its callers: cu_seqlens here, the max_logits fallback's row flags (max_logits.h).
at::Tensor read_on_host(const at::Tensor& t);

// How many times read_on_host ran in this process (a test hook, torch.ops.torch_mla._host_reads).
int64_t host_reads();

// The checks of max_seqlen that need no data, shared with the Meta kernels: not negative.
void check_max_seqlen_arg(const c10::SymInt& max_seqlen);

}  // namespace torch_mla
