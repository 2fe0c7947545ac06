#include "torch_mla/layer/sequences.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace torch_mla {

void check_max_seqlen_arg(const c10::SymInt& max_seqlen) {
  TORCH_CHECK_VALUE(max_seqlen >= 0, "torch_mla.mla_attention: max_seqlen must be 0 (not given) or the ",
                    "length of the longest sequence or more, got ", max_seqlen);
}

Sequences make_sequences(const MlaDims& d, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_max_seqlen_arg(max_seqlen);
  Sequences s;
  s.packed = d.varlen;
  s.tokens = d.tokens.expect_int();
  s.count = d.batch.expect_int();
  if (s.packed) {
    const at::Tensor cu_host = cu_seqlens->to(at::kCPU).contiguous();
    s.longest = check_cu_seqlens_values(cu_host, s.tokens, max_seqlen);
    const int32_t* v = cu_host.data_ptr<int32_t>();
    s.spans.reserve(s.count);
    for (int64_t b = 0; b < s.count; ++b) s.spans.push_back(sequence_span(v, b, 0));
    s.cu_seqlens = cu_seqlens->contiguous();
  } else {
    s.padded_len = d.seqlen.expect_int();
    s.longest = s.count > 0 ? s.padded_len : 0;
    TORCH_CHECK_VALUE(max_seqlen == 0 || s.longest <= max_seqlen, "torch_mla.mla_attention: max_seqlen (",
                      max_seqlen, ") is smaller than the longest sequence (S = ", s.longest, ")");
    s.spans.reserve(s.count);
    for (int64_t b = 0; b < s.count; ++b) s.spans.push_back(sequence_span(nullptr, b, s.padded_len));
  }
  return s;
}

}  // namespace torch_mla
