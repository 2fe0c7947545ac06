// The `efficient` core (docs/design.md §10.2): PyTorch's memory-efficient attention (the CUTLASS
// kernels behind SDPA's EFFICIENT_ATTENTION) through ATen, called from C++: O(S) memory, packed
// sequences through cu_seqlens, Dv ≠ Dn+Dr, float32 too. K = [k_nope | k_rope] is built in a
// transient buffer; nothing of K or V outlives the call.
#include <ATen/ATen.h>

#include <vector>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/aten_compat.h"
#include "torch_mla/layer/latent.h"

namespace torch_mla {
namespace {

namespace compat = cuda::aten_compat;

// The kernels' (batch, M, H, D) layout: (1, T, H, D) for packed sequences, (B, S, H, D) padded.
at::Tensor bmhd(const at::Tensor& t, const CoreProblem& p) {
  const int64_t b = p.seqs.packed ? 1 : p.seqs.count, m = p.seqs.packed ? p.seqs.tokens : p.seqs.padded_len;
  return t.contiguous().view({b, m, p.heads, t.size(-1)});
}

// lse in the kernels' (sequences, H, M) layout, M = the longest sequence rounded up.
int64_t lse_rows(const CoreProblem& p) {
  return (p.seqs.longest + compat::kEfficientLseAlign - 1) / compat::kEfficientLseAlign * compat::kEfficientLseAlign;
}

// For packed sequences: for every token, its sequence and its position in it (int64, on `device`).
std::pair<at::Tensor, at::Tensor> token_positions(const CoreProblem& p, const c10::Device& device) {
  std::vector<int64_t> seq(p.seqs.tokens), pos(p.seqs.tokens);
  for (size_t b = 0; b < p.seqs.spans.size(); ++b) {
    const SeqSpan& s = p.seqs.spans[b];
    for (int64_t i = 0; i < s.len; ++i) {
      seq[s.begin + i] = static_cast<int64_t>(b);
      pos[s.begin + i] = i;
    }
  }
  const auto to_device = [&](const std::vector<int64_t>& v) {
    return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
  };
  return {to_device(seq), to_device(pos)};
}

// (sequences, H, M) → (T, H), and back (rows past each sequence's end are zero, never read).
at::Tensor lse_per_token(const at::Tensor& lse, const CoreProblem& p) {
  const at::Tensor by_row = lse.transpose(1, 2);  // (sequences, M, H)
  if (!p.seqs.packed) return by_row.narrow(1, 0, p.seqs.padded_len).reshape({-1, p.heads}).contiguous();
  const auto [seq, pos] = token_positions(p, lse.device());
  return by_row.index({seq, pos}).contiguous();
}

at::Tensor lse_per_sequence(const at::Tensor& lse, const CoreProblem& p) {
  at::Tensor out = at::zeros({p.seqs.count, p.heads, lse_rows(p)}, lse.options());
  at::Tensor by_row = out.transpose(1, 2);
  if (!p.seqs.packed) {
    by_row.narrow(1, 0, p.seqs.padded_len).copy_(lse.view({p.seqs.count, p.seqs.padded_len, p.heads}));
  } else {
    const auto [seq, pos] = token_positions(p, lse.device());
    by_row.index_put_({seq, pos}, lse);
  }
  return out;
}

std::optional<at::Tensor> cu_seqlens(const CoreProblem& p) {
  return p.seqs.packed ? std::optional<at::Tensor>(p.seqs.cu_seqlens) : std::nullopt;
}

int64_t mask_type(const CoreProblem& p) { return p.causal ? compat::kEfficientCausal : compat::kEfficientNoMask; }

CoreOutputs efficient_forward(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                              const at::Tensor& k_rope) {
  const at::Tensor k = concat_k(kv, k_rope, p.dim_nope);
  const at::Tensor v = kv.narrow(2, p.dim_nope, p.dim_v);
  const int64_t longest = p.seqs.longest;
  const auto result = at::_efficient_attention_forward(
      bmhd(q, p), bmhd(k, p), bmhd(v, p), /*bias=*/std::nullopt, cu_seqlens(p), cu_seqlens(p), longest, longest,
      /*dropout_p=*/0.0, mask_type(p), /*compute_log_sumexp=*/true, p.softmax_scale);
  return {std::get<0>(result).view({p.seqs.tokens, p.heads, p.dim_v}), lse_per_token(std::get<1>(result), p)};
}

CoreGrads efficient_backward(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                             const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                             const at::Tensor& lse) {
  const at::Tensor k = concat_k(kv, k_rope, p.dim_nope);
  const at::Tensor v = kv.narrow(2, p.dim_nope, p.dim_v);
  const at::Tensor unused_philox = at::zeros({}, q.options().dtype(at::kLong));
  const int64_t longest = p.seqs.longest;
  const auto result = at::_efficient_attention_backward(
      bmhd(grad_out, p), bmhd(q, p), bmhd(k, p), bmhd(v, p), /*bias=*/std::nullopt, bmhd(out, p), cu_seqlens(p),
      cu_seqlens(p), longest, longest, lse_per_sequence(lse, p), /*dropout_p=*/0.0, unused_philox, unused_philox,
      mask_type(p), /*bias_requires_grad=*/false, p.softmax_scale);
  const auto per_token = [&](const at::Tensor& t) { return t.reshape({p.seqs.tokens, p.heads, t.size(-1)}); };
  const SplitKGrads g = split_k_grads(per_token(std::get<1>(result)), per_token(std::get<2>(result)), p.dim_nope);
  return {per_token(std::get<0>(result)), g.grad_kv, g.grad_k_rope};
}

const AttentionCore kEfficient{"efficient", efficient_forward, efficient_backward};
const CoreRegistration kRegistration(kEfficient);

}  // namespace
}  // namespace torch_mla
