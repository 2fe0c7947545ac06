// Meta kernels of dsa_indexer_loss: shapes and dtypes as the device kernels produce them (all
// contiguous), symbolic for torch.compile's dynamic shapes.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "torch_mla/layer/indexer_loss_checks.h"

namespace torch_mla {
namespace {

at::Tensor dsa_indexer_loss_meta(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                                 const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                                 const at::Tensor& wkv_b, const at::Tensor& lse, double /*softmax_scale*/,
                                 const std::optional<at::Tensor>& topk_indices,
                                 const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
  check_indexer_loss_inputs(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, topk_indices, cu_seqlens,
                            max_seqlen);
  return at::empty_symint(lse.sym_sizes().slice(0, lse.dim() - 1), lse.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dsa_indexer_loss_backward_meta(
    const at::Tensor& grad_kl, const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& lse, double /*softmax_scale*/, const std::optional<at::Tensor>& topk_indices,
    const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
  check_indexer_loss_backward_inputs(grad_kl, index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse,
                                     topk_indices, cu_seqlens, max_seqlen);
  return {at::empty_symint(index_q.sym_sizes(), index_q.options()),
          at::empty_symint(index_k.sym_sizes(), index_k.options()),
          at::empty_symint(weights.sym_sizes(), weights.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Meta, m) {
  m.impl("dsa_indexer_loss", TORCH_FN(dsa_indexer_loss_meta));
  m.impl("dsa_indexer_loss_backward", TORCH_FN(dsa_indexer_loss_backward_meta));
}

}  // namespace torch_mla
