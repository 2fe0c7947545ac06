// Autograd for mla_attention, registered at the Autograd key (every device). The forward saves
// only q, kv_latent, k_rope, wkv_b, out and lse (docs/design.md §3.4; max_logits is returned, never
// saved, and not differentiable: §12): per-head K and V never
// outlive the op, and the backward recomputes them from the latents. The forward picks the
// attention core once and the backward runs the same one (docs/design.md §10.1); a packed call
// without max_seqlen learns it once here for both (known_max_seqlen, docs/design.md §3.2).
#include <torch/autograd.h>
#include <torch/library.h>

#include "torch_mla/cores/table.h"
#include "torch_mla/ops/mla_attention.h"
#include "torch_mla/layer/checked_call.h"
#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/sequences.h"

namespace torch_mla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MlaAttentionFunction : public torch::autograd::Function<MlaAttentionFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& q,
      const at::Tensor& kv_latent,
      const at::Tensor& k_rope,
      const at::Tensor& wkv_b,
      double softmax_scale,
      bool causal,
      const std::optional<at::Tensor>& cu_seqlens,
      c10::SymInt max_seqlen,
      c10::string_view core,
      bool return_max_logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The call's one check and one selection (docs/design.md §10.1): the device kernel takes the
    // checked dims from the token and checks only the resolved core's own limits.
    const MlaDims d = check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens);
    const std::string resolved = resolve_core_name(q, d.dim_nope, d.dim_rope, d.dim_v, d.varlen, std::string(core));
    max_seqlen = known_max_seqlen(cu_seqlens, d.tokens, std::move(max_seqlen), resolved);
    const CheckedCall checked(q, kv_latent, k_rope, wkv_b, cu_seqlens, d);
    auto [out, lse, max_logits] = mla_attention(q, kv_latent, k_rope, wkv_b, softmax_scale, causal, cu_seqlens,
                                                max_seqlen, resolved, return_max_logits);
    ctx->save_for_backward({q, kv_latent, k_rope, wkv_b, out, lse});
    ctx->saved_data["core"] = resolved;
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["causal"] = causal;
    // cu_seqlens is (B+1,) int32 metadata, kept by reference like the scalars.
    ctx->saved_data["cu_seqlens"] = cu_seqlens;
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->mark_non_differentiable({lse, max_logits});
    return {out, lse, max_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& out = saved[4];
    // out may be unused by the loss (only lse consumed): its gradient is then zero.
    at::Tensor grad_out = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(out);
    auto [grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b] = mla_attention_backward(
        grad_out, saved[0], saved[1], saved[2], saved[3], out, saved[5],
        ctx->saved_data["softmax_scale"].toDouble(), ctx->saved_data["causal"].toBool(),
        ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>(),
        ctx->saved_data["max_seqlen"].toSymInt(), ctx->saved_data["core"].toStringRef());
    return {grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Wraps the backward op so that differentiating through it fails with a clear message instead
// of silently returning wrong second derivatives.
class MlaAttentionBackwardFunction : public torch::autograd::Function<MlaAttentionBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* /*ctx*/,
      const at::Tensor& grad_out,
      const at::Tensor& q,
      const at::Tensor& kv_latent,
      const at::Tensor& k_rope,
      const at::Tensor& wkv_b,
      const at::Tensor& out,
      const at::Tensor& lse,
      double softmax_scale,
      bool causal,
      const std::optional<at::Tensor>& cu_seqlens,
      c10::SymInt max_seqlen,
      c10::string_view core) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b] = mla_attention_backward(
        grad_out, q, kv_latent, k_rope, wkv_b, out, lse, softmax_scale, causal, cu_seqlens, max_seqlen,
        core);
    return {grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "torch_mla.mla_attention: double backward (differentiating the gradient, e.g. "
                "autograd.grad(create_graph=True) then backward) is not supported");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_autograd(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core,
    bool return_max_logits) {
  auto result = MlaAttentionFunction::apply(q, kv_latent, k_rope, wkv_b, softmax_scale, causal,
                                            cu_seqlens, std::move(max_seqlen), core, return_max_logits);
  return {result[0], result[1], result[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_attention_backward_autograd(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core) {
  auto result = MlaAttentionBackwardFunction::apply(grad_out, q, kv_latent, k_rope, wkv_b, out, lse,
                                                    softmax_scale, causal, cu_seqlens,
                                                    std::move(max_seqlen), core);
  return {result[0], result[1], result[2], result[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("mla_attention", TORCH_FN(mla_attention_autograd));
  m.impl("mla_attention_backward", TORCH_FN(mla_attention_backward_autograd));
}

}  // namespace torch_mla
