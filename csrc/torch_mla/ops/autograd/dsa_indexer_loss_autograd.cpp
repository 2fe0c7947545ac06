// Autograd for dsa_indexer_loss (docs/design.md §18): the forward saves its inputs and nothing else
// (the backward recomputes the teacher and the indexer's scores chunk by chunk); gradients reach
// index_q, index_k and weights only, the teacher's tensors (q, kv_latent, k_rope, wkv_b, lse) are
// treated as detached and get undefined gradients.
#include <torch/autograd.h>
#include <torch/library.h>

#include "torch_mla/ops/dsa_indexer_loss.h"

namespace torch_mla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DsaIndexerLossFunction : public torch::autograd::Function<DsaIndexerLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& index_q, const at::Tensor& index_k,
                            const at::Tensor& weights, const at::Tensor& q, const at::Tensor& kv_latent,
                            const at::Tensor& k_rope, const at::Tensor& wkv_b, const at::Tensor& lse,
                            double softmax_scale, const std::optional<at::Tensor>& topk_indices,
                            const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor kl = dsa_indexer_loss(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, softmax_scale,
                                     topk_indices, cu_seqlens, max_seqlen);
    ctx->save_for_backward({index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse,
                            topk_indices.value_or(at::Tensor())});
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["cu_seqlens"] = cu_seqlens;
    ctx->saved_data["max_seqlen"] = max_seqlen;
    return kl;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor& lse = s[7];
    const at::Tensor grad_kl = grad_outputs[0].defined()
                                   ? grad_outputs[0]
                                   : at::zeros(lse.sizes().slice(0, lse.dim() - 1), lse.options());
    const std::optional<at::Tensor> topk_indices = s[8].defined() ? std::optional<at::Tensor>(s[8]) : std::nullopt;
    auto [grad_index_q, grad_index_k, grad_weights] = dsa_indexer_loss_backward(
        grad_kl, s[0], s[1], s[2], s[3], s[4], s[5], s[6], lse, ctx->saved_data["softmax_scale"].toDouble(),
        topk_indices, ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>(), ctx->saved_data["max_seqlen"].toSymInt());
    return {grad_index_q, grad_index_k, grad_weights, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Differentiating the backward fails with a clear message instead of wrong second derivatives.
class DsaIndexerLossBackwardFunction : public torch::autograd::Function<DsaIndexerLossBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_kl, const at::Tensor& index_q,
                               const at::Tensor& index_k, const at::Tensor& weights, const at::Tensor& q,
                               const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
                               const at::Tensor& lse, double softmax_scale,
                               const std::optional<at::Tensor>& topk_indices,
                               const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_index_q, grad_index_k, grad_weights] =
        dsa_indexer_loss_backward(grad_kl, index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, softmax_scale,
                                  topk_indices, cu_seqlens, std::move(max_seqlen));
    return {grad_index_q, grad_index_k, grad_weights};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "torch_mla.dsa_indexer_loss: double backward (differentiating the gradient, e.g. "
                "autograd.grad(create_graph=True) then backward) is not supported");
  }
};

at::Tensor dsa_indexer_loss_autograd(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                                     const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                                     const at::Tensor& wkv_b, const at::Tensor& lse, double softmax_scale,
                                     const std::optional<at::Tensor>& topk_indices,
                                     const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
  return DsaIndexerLossFunction::apply(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse, softmax_scale,
                                       topk_indices, cu_seqlens, std::move(max_seqlen));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dsa_indexer_loss_backward_autograd(
    const at::Tensor& grad_kl, const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& lse, double softmax_scale, const std::optional<at::Tensor>& topk_indices,
    const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
  auto r = DsaIndexerLossBackwardFunction::apply(grad_kl, index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse,
                                                 softmax_scale, topk_indices, cu_seqlens, std::move(max_seqlen));
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("dsa_indexer_loss", TORCH_FN(dsa_indexer_loss_autograd));
  m.impl("dsa_indexer_loss_backward", TORCH_FN(dsa_indexer_loss_backward_autograd));
}

}  // namespace torch_mla
