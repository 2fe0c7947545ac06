#include "torch_mla/layer/sequences.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

#include "torch_mla/cores/table.h"

namespace torch_mla {
namespace {

std::atomic<int64_t> reads{0};

}  // namespace

void check_max_seqlen_arg(const c10::SymInt& max_seqlen) {
  TORCH_CHECK_VALUE(max_seqlen >= 0, "torch_mla.mla_attention: max_seqlen must be 0 (not given) or the ",
                    "length of the longest sequence or more, got ", max_seqlen);
}

at::Tensor read_on_host(const at::Tensor& t) {
  ++reads;
  return t.to(at::kCPU).contiguous();
}

int64_t host_reads() { return reads.load(); }

int64_t learn_max_seqlen(const at::Tensor& cu_seqlens, int64_t tokens) {
  return check_cu_seqlens_values(read_on_host(cu_seqlens), tokens, 0);
}

c10::SymInt known_max_seqlen(const std::optional<at::Tensor>& cu_seqlens, const c10::SymInt& tokens,
                             c10::SymInt max_seqlen, const std::string& core) {
  if (!cu_seqlens.has_value() || !cu_seqlens->defined() || max_seqlen.maybe_as_int() != 0) return max_seqlen;
  const at::Tensor& cu = *cu_seqlens;
  const auto no_data = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  const CoreEntry* entry = find_entry(core);
  if (entry == nullptr || entry->host_spans || cu.key_set().has_any(no_data) ||
      !(cu.is_cpu() || cu.is_cuda()) || !tokens.maybe_as_int()) {
    return max_seqlen;
  }
  return learn_max_seqlen(cu, *tokens.maybe_as_int());
}

Sequences make_sequences(const MlaDims& d, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                         bool host_spans) {
  check_max_seqlen_arg(max_seqlen);
  Sequences s;
  s.packed = d.varlen;
  s.tokens = d.tokens.expect_int();
  s.count = d.batch.expect_int();
  if (s.packed) {
    s.cu_seqlens = cu_seqlens->contiguous();
    if (!host_spans && max_seqlen > 0) {
      // The no-sync path (docs/design.md §3.2): max_seqlen sizes the grids, the kernels read
      // cu_seqlens on the device.
      s.longest = max_seqlen;
      return s;
    }
    const at::Tensor cu_host = read_on_host(*cu_seqlens);
    s.longest = check_cu_seqlens_values(cu_host, s.tokens, max_seqlen);
    const int32_t* v = cu_host.data_ptr<int32_t>();
    s.spans.reserve(s.count);
    for (int64_t b = 0; b < s.count; ++b) s.spans.push_back(sequence_span(v, b, 0));
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
