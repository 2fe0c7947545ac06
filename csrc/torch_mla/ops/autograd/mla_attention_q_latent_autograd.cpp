// Autograd for mla_attention_q_latent, registered at the Autograd key (every device). The forward
// saves c_q instead of q; the backward recomputes q from c_q (one GEMM and the rotation), runs
// mla_attention_backward, and takes the gradient back through the rotation and the GEMM.
#include <torch/autograd.h>
#include <torch/library.h>

#include "torch_mla/cores/table.h"
#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/sequences.h"
#include "torch_mla/ops/mla_attention.h"
#include "torch_mla/ops/mla_attention_q_latent.h"
#include "torch_mla/layer/q_expand.h"

namespace torch_mla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "torch_mla.mla_attention_q_latent: ";

class MlaAttentionQLatentFunction : public torch::autograd::Function<MlaAttentionQLatentFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& q_latent,
      const at::Tensor& wq_b,
      const at::Tensor& cos,
      const at::Tensor& sin,
      const at::Tensor& kv_latent,
      const at::Tensor& k_rope,
      const at::Tensor& wkv_b,
      int64_t num_heads,
      double softmax_scale,
      bool causal,
      bool rope_interleave,
      const std::optional<at::Tensor>& cu_seqlens,
      c10::SymInt max_seqlen,
      c10::string_view core,
      bool return_max_logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check_q_latent_inputs(q_latent, wq_b, cos, sin, k_rope, num_heads, cu_seqlens);
    // The core is picked once, from the dims q will have: Dn+Dr = wq_b rows per head.
    const c10::SymInt dim_rope = k_rope.sym_size(-1), dim_nope = wq_b.sym_size(0) / num_heads - dim_rope;
    const std::string resolved = naming_errors_as(kOp, [&] {
      return resolve_core_name(q_latent, dim_nope, dim_rope, wkv_b.sym_size(0) / num_heads - dim_nope,
                               cu_seqlens.has_value() && cu_seqlens->defined(), std::string(core));
    });
    max_seqlen = naming_errors_as(kOp, [&] {
      return known_max_seqlen(cu_seqlens, q_latent.sym_size(0), std::move(max_seqlen), resolved);
    });
    auto [out, lse, max_logits] = mla_attention_q_latent(q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b,
                                                         num_heads, softmax_scale, causal, rope_interleave,
                                                         cu_seqlens, max_seqlen, resolved, return_max_logits);
    ctx->saved_data["core"] = resolved;
    ctx->save_for_backward({q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, out, lse});
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["rope_interleave"] = rope_interleave;
    ctx->saved_data["cu_seqlens"] = cu_seqlens;
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->mark_non_differentiable({lse, max_logits});
    return {out, lse, max_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The saved tensors already have the dtype autocast chose in the forward; a backward called
    // inside torch.autocast must not recast them.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q_latent = saved[0], &wq_b = saved[1], &cos = saved[2], &sin = saved[3];
    const at::Tensor &out = saved[7], &lse = saved[8];
    const bool rope_interleave = ctx->saved_data["rope_interleave"].toBool();
    const bool need_rope = ctx->needs_input_grad(2) || ctx->needs_input_grad(3);

    at::Tensor q_projected = project_q(q_latent, wq_b, ctx->saved_data["num_heads"].toInt());
    at::Tensor q = rotate_q(q_projected, cos, sin, rope_interleave);
    if (!need_rope) q_projected = at::Tensor();

    at::Tensor grad_out = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(out);
    auto [grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b] = naming_errors_as(kOp, [&] {
      return mla_attention_backward(
          grad_out, q, saved[4], saved[5], saved[6], out, lse,
          ctx->saved_data["softmax_scale"].toDouble(), ctx->saved_data["causal"].toBool(),
          ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>(),
          ctx->saved_data["max_seqlen"].toSymInt(), ctx->saved_data["core"].toStringRef());
    });
    q = at::Tensor();  // the recomputed q is not needed past the attention backward

    ExpandQGrads g = expand_q_backward(grad_q, q_projected, q_latent, wq_b, cos, sin,
                                       rope_interleave, ctx->needs_input_grad(0),
                                       ctx->needs_input_grad(1), need_rope);
    return {g.q_latent, g.wq_b, g.cos, g.sin, grad_kv_latent, grad_k_rope, grad_wkv_b,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_q_latent_autograd(
    const at::Tensor& q_latent,
    const at::Tensor& wq_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    int64_t num_heads,
    double softmax_scale,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core,
    bool return_max_logits) {
  auto result = MlaAttentionQLatentFunction::apply(q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b,
                                                   num_heads, softmax_scale, causal, rope_interleave,
                                                   cu_seqlens, std::move(max_seqlen), core, return_max_logits);
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("mla_attention_q_latent", TORCH_FN(mla_attention_q_latent_autograd));
}

}  // namespace torch_mla
