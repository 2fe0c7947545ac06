// The `cudnn` core (docs/design.md §10.2): cuDNN's fused attention through ATen, called from C++.
// K = [k_nope | k_rope] is built in a transient buffer (k_rope broadcast over heads there only) and
// V is taken from the latent layer's KV buffer; nothing of either outlives the call. Padded
// batches only: the sequence list is B × S.
#include <ATen/ATen.h>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/aten_compat.h"
#include "torch_mla/layer/latent.h"

namespace torch_mla {
namespace {

// (T, H, D) → (B, H, S, D), a view with (B, S, H, D) memory order.
at::Tensor bhsd(const at::Tensor& t, const CoreProblem& p) {
  return t.reshape({p.seqs.count, p.seqs.padded_len, p.heads, t.size(-1)}).transpose(1, 2);
}

// (B, H, S, D) → (T, H, D), contiguous.
at::Tensor per_token(const at::Tensor& t) {
  return t.transpose(1, 2).reshape({-1, t.size(1), t.size(3)}).contiguous();
}

CoreOutputs cudnn_forward(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                          const at::Tensor& k_rope) {
  const at::Tensor k = concat_k(kv, k_rope, p.dim_nope);
  const at::Tensor v = kv.narrow(2, p.dim_nope, p.dim_v).contiguous();
  const auto result = at::_scaled_dot_product_cudnn_attention(
      bhsd(q.contiguous(), p), bhsd(k, p), bhsd(v, p), /*attn_bias=*/std::nullopt, /*compute_log_sumexp=*/true,
      /*dropout_p=*/0.0, p.causal, /*return_debug_mask=*/false, p.softmax_scale);
  const at::Tensor& lse = std::get<1>(result);  // (B, H, S[, 1])
  return {per_token(std::get<0>(result)),
          lse.reshape({p.seqs.count, p.heads, p.seqs.padded_len}).transpose(1, 2).reshape({-1, p.heads}).contiguous()};
}

CoreGrads cudnn_backward(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                         const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                         const at::Tensor& lse) {
  const at::Tensor k = concat_k(kv, k_rope, p.dim_nope);
  const at::Tensor v = kv.narrow(2, p.dim_nope, p.dim_v).contiguous();
  // out and grad_out in the forward's output layout ((B, S, H, Dv) memory): torch <= 2.13 keys its
  // cuDNN graph cache on q, k and v only, so every tensor must keep the layout the graph was built for.
  const at::Tensor lse_bhs1 =
      lse.reshape({p.seqs.count, p.seqs.padded_len, p.heads}).permute({0, 2, 1}).contiguous().unsqueeze(-1);
  const at::Tensor unused_philox = at::zeros({}, q.options().dtype(at::kLong));
  const auto [dq, dk, dv] = at::_scaled_dot_product_cudnn_attention_backward(
      bhsd(grad_out.contiguous(), p), bhsd(q.contiguous(), p), bhsd(k, p), bhsd(v, p), bhsd(out.contiguous(), p),
      lse_bhs1, unused_philox, unused_philox, /*attn_bias=*/at::Tensor(), /*cum_seq_q=*/at::Tensor(),
      /*cum_seq_k=*/at::Tensor(), p.seqs.padded_len, p.seqs.padded_len, /*dropout_p=*/0.0, p.causal, p.softmax_scale);
  const SplitKGrads g = split_k_grads(per_token(dk), per_token(dv), p.dim_nope);
  return {per_token(dq), g.grad_kv, g.grad_k_rope};
}

const AttentionCore kCudnn{"cudnn", cudnn_forward, cudnn_backward};
const CoreRegistration kRegistration(kCudnn);

}  // namespace
}  // namespace torch_mla
