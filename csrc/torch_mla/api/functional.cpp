#include "torch_mla/api/functional.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

#include "torch_mla/ops/mla_attention.h"
#include "torch_mla/ops/dsa_indexer_loss.h"
#include "torch_mla/ops/mla_sparse_attention.h"

namespace torch_mla {

double default_softmax_scale(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.defined() && q.dim() >= 1,
                    "torch_mla.mla_attention: q must be a tensor of shape (..., H, Dn+Dr)");
  return 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}

namespace {

// The dispatcher op reaches the Autograd kernel (our C++ autograd Function), then the device
// kernel; lse is only needed by the backward, which the Function keeps itself.
std::tuple<at::Tensor, at::Tensor> call_op(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                                           const at::Tensor& wkv_b, const MlaOptions& options, bool max_logits) {
  const double scale = options.softmax_scale() ? *options.softmax_scale() : default_softmax_scale(q);
  auto [out, lse, logits] = mla_attention(q, kv_latent, k_rope, wkv_b, scale, options.causal(), options.cu_seqlens(),
                                          c10::SymInt(options.max_seqlen()), options.core(), max_logits);
  return {out, logits};
}

}  // namespace

at::Tensor mla_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const MlaOptions& options) {
  return std::get<0>(call_op(q, kv_latent, k_rope, wkv_b, options, false));
}

std::tuple<at::Tensor, at::Tensor> mla_attention_with_max_logits(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const MlaOptions& options) {
  return call_op(q, kv_latent, k_rope, wkv_b, options, true);
}

at::Tensor mla_sparse_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& topk_indices,
    const MlaOptions& options) {
  TORCH_CHECK_VALUE(options.causal(), "torch_mla.mla_sparse_attention: sparse attention is causal only, "
                    "got MlaOptions().causal(false)");
  const double scale = options.softmax_scale() ? *options.softmax_scale() : default_softmax_scale(q);
  return std::get<0>(torch_mla::mla_sparse_attention(q, kv_latent, k_rope, wkv_b, topk_indices, scale,
                                                     options.cu_seqlens(), c10::SymInt(options.max_seqlen()),
                                                     options.core(), false));
}

at::Tensor dsa_indexer_loss(
    const at::Tensor& index_q,
    const at::Tensor& index_k,
    const at::Tensor& weights,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& lse,
    const IndexerLossOptions& options) {
  const double scale = options.softmax_scale() ? *options.softmax_scale() : default_softmax_scale(q);
  return torch_mla::dsa_indexer_loss(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, scale,
                                     options.topk_indices(), options.cu_seqlens(), c10::SymInt(options.max_seqlen()));
}

std::string explain(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const MlaOptions& options) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::_explain", "")
                       .typed<std::string(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, c10::string_view)>();
  return op.call(q, kv_latent, k_rope, wkv_b, options.cu_seqlens(), options.core());
}

}  // namespace torch_mla
