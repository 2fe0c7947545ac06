// Autograd for mla_attention_block, registered at the Autograd key (every device), docs/design.md §13.
// The forward saves only the block's inputs (q_a, kv_a, cos, sin, the weights) and the norms'
// per-row rstd. The backward recomputes the norms, q and k_rope, then out with one attention
// forward through the core the forward ran, and takes the gradient back through o_proj
// (dwo = dyᵀ·out, dout = dy·wo), the attention, the q expansion and RoPE, and the norms.
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "torch_mla/cores/select.h"
#include "torch_mla/mla_attention.h"
#include "torch_mla/mla_attention_block.h"
#include "torch_mla/q_expand.h"
#include "torch_mla/rms_norm.h"

namespace torch_mla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Positions of the differentiable inputs in the schema.
enum Input { kQA, kQNorm, kWqB, kKvA, kKvNorm, kWkvB, kWo, kBo, kCos, kSin, kNumInputs = 19 };

class MlaAttentionBlockFunction : public torch::autograd::Function<MlaAttentionBlockFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& q_a,
      const std::optional<at::Tensor>& q_norm_weight,
      const at::Tensor& wq_b,
      const at::Tensor& kv_a,
      const at::Tensor& kv_norm_weight,
      const at::Tensor& wkv_b,
      const at::Tensor& wo,
      const std::optional<at::Tensor>& bo,
      const at::Tensor& cos,
      const at::Tensor& sin,
      int64_t num_heads,
      double softmax_scale,
      double q_norm_eps,
      double kv_norm_eps,
      bool causal,
      bool rope_interleave,
      const std::optional<at::Tensor>& cu_seqlens,
      c10::SymInt max_seqlen,
      c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check_block_inputs(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                       cu_seqlens);
    // The core is picked once (docs/design.md §10.1), from the dims q will have.
    const BlockDims d = block_dims(wq_b, kv_a, wkv_b, num_heads);
    const std::string core = resolve_core_name(q_a, d.nope, d.rope, d.v,
                                               cu_seqlens.has_value() && cu_seqlens->defined(), std::string(backend));
    auto [y, q_rstd, kv_rstd] = mla_attention_block_with_rstd(
        q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads, softmax_scale,
        q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens, max_seqlen, core);
    ctx->save_for_backward({q_a, q_norm_weight.value_or(at::Tensor()), wq_b, kv_a, kv_norm_weight, wkv_b, wo,
                            cos, sin, q_rstd, kv_rstd});
    ctx->saved_data["core"] = core;
    ctx->saved_data["has_bias"] = bo.has_value() && bo->defined();
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["rope_interleave"] = rope_interleave;
    ctx->saved_data["cu_seqlens"] = cu_seqlens;
    ctx->saved_data["max_seqlen"] = max_seqlen;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(kNumInputs);
    if (!grad_outputs[0].defined()) return grads;
    // The saved tensors already have the dtype autocast chose in the forward; a backward called
    // inside torch.autocast must not recast them.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q_a = saved[0], &wq_b = saved[2], &kv_a = saved[3], &kv_norm_weight = saved[4];
    const at::Tensor &wkv_b = saved[5], &wo = saved[6], &cos = saved[7], &sin = saved[8];
    const at::Tensor &q_rstd = saved[9], &kv_rstd = saved[10];
    const std::optional<at::Tensor> q_norm_weight =
        saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    const bool rope_interleave = ctx->saved_data["rope_interleave"].toBool();
    const double softmax_scale = ctx->saved_data["softmax_scale"].toDouble();
    const bool causal = ctx->saved_data["causal"].toBool();
    const auto cu_seqlens = ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>();
    const c10::SymInt max_seqlen = ctx->saved_data["max_seqlen"].toSymInt();
    const std::string core = ctx->saved_data["core"].toStringRef();
    // needs_input_grad counts only the tensors given: an absent optional (q_norm_weight, bo)
    // shifts the inputs after it.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto need = [&](Input i) {
      if ((i == kQNorm && !q_norm_weight) || (i == kBo && !has_bias)) return false;
      return ctx->needs_input_grad(i - (i > kQNorm && !q_norm_weight) - (i > kBo && !has_bias));
    };
    const bool need_rope = need(kCos) || need(kSin);

    BlockLatents l = block_latents(q_a, q_norm_weight, q_rstd, wq_b, kv_a, kv_norm_weight, kv_rstd, wkv_b, cos,
                                   sin, ctx->saved_data["num_heads"].toInt(), rope_interleave);
    // Every recomputed tensor is released as soon as its last use is done: they are this step's
    // transient peak (docs/design.md §13.5).
    if (!need_rope) l.q_projected = at::Tensor();
    at::Tensor out, lse;
    std::tie(out, lse, std::ignore) = mla_attention(l.q, l.kv_latent, l.k_rope, wkv_b, softmax_scale, causal,
                                        cu_seqlens, max_seqlen, core);

    at::Tensor grad_out;
    {  // o_proj: y = out·woᵀ + bo; the grad of y is not needed past it
      const at::Tensor grad_y = std::move(grad_outputs[0]);
      const at::Tensor grad_y_rows = grad_y.reshape_symint({-1, grad_y.sym_size(-1)});
      if (need(kWo)) grads[kWo] = at::mm(grad_y_rows.t(), out.flatten(-2).reshape_symint({-1, wo.sym_size(1)}));
      if (need(kBo)) grads[kBo] = grad_y_rows.sum(0);
      grad_out = at::matmul(grad_y, wo).view_symint(out.sym_sizes());
    }

    auto [grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b] = mla_attention_backward(
        grad_out, l.q, l.kv_latent, l.k_rope, wkv_b, out, lse, softmax_scale, causal, cu_seqlens, max_seqlen, core);
    grads[kWkvB] = grad_wkv_b;
    out = grad_out = l.q = l.kv_latent = l.k_rope = at::Tensor();

    const bool need_c_q = need(kQA) || need(kQNorm);
    ExpandQGrads gq = expand_q_backward(grad_q, l.q_projected, l.c_q, wq_b, cos, sin, rope_interleave, need_c_q,
                                        need(kWqB), need_rope);
    grads[kWqB] = gq.wq_b;
    grad_q = l.q_projected = l.c_q = at::Tensor();
    if (need_c_q && q_norm_weight) {
      RmsNormGrads gn = rms_norm_backward(gq.q_latent, q_a, *q_norm_weight, q_rstd, need(kQA), need(kQNorm));
      grads[kQA] = gn.x;
      grads[kQNorm] = gn.weight;
    } else {
      grads[kQA] = gq.q_latent;
    }

    RotateQGrads gk = rotate_q_backward(grad_k_rope.unsqueeze(-2), l.k_rope_raw.unsqueeze(-2), cos, sin,
                                        rope_interleave, need(kKvA), need_rope);
    if (need(kKvA) || need(kKvNorm)) {
      RmsNormGrads gn = rms_norm_backward(grad_kv_latent, kv_a.narrow_symint(-1, 0, wkv_b.sym_size(1)),
                                          kv_norm_weight, kv_rstd, need(kKvA), need(kKvNorm));
      if (need(kKvA)) grads[kKvA] = at::cat({gn.x, gk.q.squeeze(-2)}, -1);
      grads[kKvNorm] = gn.weight;
    }
    if (need_rope) {
      grads[kCos] = gq.cos.add(gk.cos);
      grads[kSin] = gq.sin.add(gk.sin);
    }
    return grads;
  }
};

at::Tensor mla_attention_block_autograd(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view backend) {
  return MlaAttentionBlockFunction::apply(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin,
                                          num_heads, softmax_scale, q_norm_eps, kv_norm_eps, causal,
                                          rope_interleave, cu_seqlens, std::move(max_seqlen), backend);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("mla_attention_block", TORCH_FN(mla_attention_block_autograd));
}

}  // namespace torch_mla
