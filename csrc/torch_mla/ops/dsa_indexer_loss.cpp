// dsa_indexer_loss and its backward: the schemas and the typed entry points through the dispatcher
// (docs/design.md §18). Kernels: autograd/, autocast/, meta/, device/ (CPU and CUDA).
#include "torch_mla/ops/dsa_indexer_loss.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torch_mla {

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  m.def(
      "dsa_indexer_loss(Tensor index_q, Tensor index_k, Tensor weights, Tensor q, Tensor kv_latent, Tensor k_rope, "
      "Tensor wkv_b, Tensor lse, float softmax_scale, Tensor? topk_indices, Tensor? cu_seqlens, SymInt max_seqlen) "
      "-> Tensor kl",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "dsa_indexer_loss_backward(Tensor grad_kl, Tensor index_q, Tensor index_k, Tensor weights, Tensor q, "
      "Tensor kv_latent, Tensor k_rope, Tensor wkv_b, Tensor lse, float softmax_scale, Tensor? topk_indices, "
      "Tensor? cu_seqlens, SymInt max_seqlen) -> (Tensor grad_index_q, Tensor grad_index_k, Tensor grad_weights)",
      {at::Tag::pt2_compliant_tag});
}

at::Tensor dsa_indexer_loss(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                            const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                            const at::Tensor& wkv_b, const at::Tensor& lse, double softmax_scale,
                            const std::optional<at::Tensor>& topk_indices,
                            const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::dsa_indexer_loss", "")
                       .typed<decltype(dsa_indexer_loss)>();
  return op.call(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, softmax_scale, topk_indices, cu_seqlens,
                 std::move(max_seqlen));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dsa_indexer_loss_backward(
    const at::Tensor& grad_kl, const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& lse, double softmax_scale, const std::optional<at::Tensor>& topk_indices,
    const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::dsa_indexer_loss_backward", "")
                       .typed<decltype(dsa_indexer_loss_backward)>();
  return op.call(grad_kl, index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, softmax_scale, topk_indices,
                 cu_seqlens, std::move(max_seqlen));
}

}  // namespace torch_mla
