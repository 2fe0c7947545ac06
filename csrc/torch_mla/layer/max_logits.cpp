// The maximum-logit fallback of docs/design.md §12.2: an exact recomputation of the scores of the
// rows that lse does not rule out, chunked so that memory stays bounded.
#include "torch_mla/layer/max_logits.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "torch_mla/layer/chunking.h"
#include "torch_mla/layer/math.h"
#include "torch_mla/layer/sequences.h"

namespace torch_mla {
namespace {


// Causal: query rows per chunk, so that a chunk's keys stop at its last row (about half the
// square is never computed); the per-chunk overhead of 128 rows is small against their scores.
constexpr int64_t kCausalRows = 128;

// lse is the core's float arithmetic, not exact: a row is skipped only if its lse is below the
// head's best lower bound by more than this (relative) slack, far above float32 rounding.
constexpr double kSlack = 1e-3;

}  // namespace

at::Tensor max_logits_from_scores(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                                  const at::Tensor& k_rope, const at::Tensor& lse) {
  const int64_t T = p.seqs.tokens, H = p.heads, Dn = p.dim_nope, Dr = p.dim_rope;
  const auto acc = lse.scalar_type();
  const auto opts = lse.options();
  // Visible keys of every row: its position + 1 (causal) or its sequence's length.
  std::vector<double> visible(T);
  for (const SeqSpan& seq : p.seqs.spans) {
    for (int64_t i = 0; i < seq.len; ++i) visible[seq.begin + i] = static_cast<double>(p.causal ? i + 1 : seq.len);
  }
  const at::Tensor log_visible =
      at::tensor(visible, at::TensorOptions().dtype(at::kDouble)).log_().to(opts.device(), acc).unsqueeze(1);
  const at::Tensor best_lower = (lse - log_visible).amax(0);                        // (H,)
  const at::Tensor threshold = best_lower - best_lower.abs().add(1).mul_(kSlack);   // (H,)
  // A row is recomputed (for all heads) when any head needs it: one host copy of (T,) flags.
  const at::Tensor needed = read_on_host((lse >= threshold).any(1));
  const bool* need = needed.const_data_ptr<bool>();

  at::Tensor result = at::full({H}, -std::numeric_limits<double>::infinity(), opts);
  for (const SeqSpan& seq : p.seqs.spans) {
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < seq.len; ++i) {
      if (need[seq.begin + i]) rows.push_back(i);
    }
    if (rows.empty()) continue;
    const at::Tensor kv_seq = kv.narrow(0, seq.begin, seq.len).to(acc);         // (L, H, Dn+Dv)
    const at::Tensor k_nope = kv_seq.narrow(2, 0, Dn).permute({1, 2, 0});       // (H, Dn, L)
    const at::Tensor k_r = k_rope.narrow(0, seq.begin, seq.len).to(acc).t();   // (Dr, L)
    const at::Tensor key_pos = at::arange(seq.len, opts.dtype(at::kLong));
    const int64_t most = p.causal ? kCausalRows : static_cast<int64_t>(rows.size());
    const int64_t chunk = std::clamp<int64_t>(chunk_elements() / (H * seq.len), 1, most);
    for (size_t r0 = 0; r0 < rows.size(); r0 += chunk) {
      const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(rows.size() - r0));
      // rows ascend: under causal masking the chunk's last row sees the most keys.
      const int64_t keys = visible_key_end(rows[r0 + n - 1] + 1, seq.len, p.causal);
      const at::Tensor pos =
          at::tensor(std::vector<int64_t>(rows.begin() + r0, rows.begin() + r0 + n), at::kLong).to(opts.device());
      const at::Tensor qs = q.narrow(0, seq.begin, seq.len).index_select(0, pos).to(acc);  // (n, H, Dn+Dr)
      // scores (H, n, keys) = q_nope·k_nopeᵀ per head + q_rope·k_ropeᵀ (k_rope shared by the heads)
      at::Tensor s = at::bmm(qs.narrow(2, 0, Dn).transpose(0, 1), k_nope.narrow(2, 0, keys));
      if (Dr > 0) s.add_(at::matmul(qs.narrow(2, Dn, Dr), k_r.narrow(1, 0, keys)).transpose(0, 1));
      s.mul_(p.softmax_scale);
      if (p.causal) {
        s.masked_fill_(key_pos.narrow(0, 0, keys).unsqueeze(0) > pos.unsqueeze(1),
                       -std::numeric_limits<double>::infinity());
      }
      result = at::maximum(result, s.amax({1, 2}));
    }
  }
  return result;
}

}  // namespace torch_mla
