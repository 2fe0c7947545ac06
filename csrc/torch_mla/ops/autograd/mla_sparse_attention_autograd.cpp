// Autograd for mla_sparse_attention (docs/design.md §16.2): the forward saves exactly q, kv_latent,
// k_rope, wkv_b, topk_indices, out and lse — never the absorbed q nor the latent output, which the
// backward rebuilds. The core name is resolved once here and the backward runs the same one.
#include <torch/autograd.h>
#include <torch/library.h>

#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/ops/mla_sparse_attention.h"

namespace torch_mla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MlaSparseAttentionFunction : public torch::autograd::Function<MlaSparseAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& kv_latent,
                               const at::Tensor& k_rope, const at::Tensor& wkv_b, const at::Tensor& topk_indices,
                               double softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
                               c10::SymInt max_seqlen, c10::string_view core, bool return_max_logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The arguments are checked once, by the device kernel below (docs/design.md §10.1).
    const std::string resolved = resolve_sparse_core(std::string(core));
    auto [out, lse, max_logits] = mla_sparse_attention(q, kv_latent, k_rope, wkv_b, topk_indices, softmax_scale,
                                                       cu_seqlens, max_seqlen, resolved, return_max_logits);
    ctx->save_for_backward({q, kv_latent, k_rope, wkv_b, topk_indices, out, lse});
    ctx->saved_data["core"] = resolved;
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["cu_seqlens"] = cu_seqlens;
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->mark_non_differentiable({lse, max_logits});
    return {out, lse, max_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& out = saved[5];
    at::Tensor grad_out = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(out);
    auto [grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b] = mla_sparse_attention_backward(
        grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], out, saved[6],
        ctx->saved_data["softmax_scale"].toDouble(), ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>(),
        ctx->saved_data["max_seqlen"].toSymInt(), ctx->saved_data["core"].toStringRef());
    return {grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Differentiating the backward fails with a clear message instead of wrong second derivatives.
class MlaSparseAttentionBackwardFunction : public torch::autograd::Function<MlaSparseAttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
                               const at::Tensor& topk_indices, const at::Tensor& out, const at::Tensor& lse,
                               double softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
                               c10::SymInt max_seqlen, c10::string_view core) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b] = mla_sparse_attention_backward(
        grad_out, q, kv_latent, k_rope, wkv_b, topk_indices, out, lse, softmax_scale, cu_seqlens, max_seqlen, core);
    return {grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "torch_mla.mla_sparse_attention: double backward (differentiating the gradient, e.g. "
                "autograd.grad(create_graph=True) then backward) is not supported");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_autograd(
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& topk_indices, double softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen, c10::string_view core, bool return_max_logits) {
  auto r = MlaSparseAttentionFunction::apply(q, kv_latent, k_rope, wkv_b, topk_indices, softmax_scale, cu_seqlens,
                                             std::move(max_seqlen), core, return_max_logits);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
    const at::Tensor& wkv_b, const at::Tensor& topk_indices, const at::Tensor& out, const at::Tensor& lse,
    double softmax_scale, const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen,
    c10::string_view core) {
  auto r = MlaSparseAttentionBackwardFunction::apply(grad_out, q, kv_latent, k_rope, wkv_b, topk_indices, out, lse,
                                                     softmax_scale, cu_seqlens, std::move(max_seqlen), core);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("mla_sparse_attention", TORCH_FN(mla_sparse_attention_autograd));
  m.impl("mla_sparse_attention_backward", TORCH_FN(mla_sparse_attention_backward_autograd));
}

}  // namespace torch_mla
