// Autograd for mla_attention_block, registered at the Autograd key (every device), docs/design.md §13.
// The forward saves only the block's inputs (q_a, kv_a, cos, sin, the weights) and the norms'
// per-row rstd. The backward recomputes the norms and k_rope, then per head group q and out with
// one attention forward through the core the forward ran, and takes the gradient back through
// o_proj (dwo = dyᵀ·out, dout = dy·wo), the attention and the q expansion and RoPE of that group;
// then through k_rope's RoPE and the norms.
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
enum Input { kQA, kQNorm, kWqB, kKvA, kKvNorm, kWkvB, kWo, kBo, kCos, kSin, kNumInputs = 20 };

// sum += part (sum taken over when undefined; an undefined part adds nothing).
void accumulate(at::Tensor& sum, at::Tensor part) {
  if (!part.defined()) return;
  if (sum.defined()) {
    sum.add_(part);
  } else {
    sum = std::move(part);
  }
}

// A weight's grad from its head groups' slices (along `dim`, from `start`): the slice itself when
// it is the whole weight, else copied into one buffer of the weight's size (not a list of slices
// joined at the end, which would hold the weight's size twice).
void place(at::Tensor& grad, at::Tensor part, const at::Tensor& weight, int64_t dim, const c10::SymInt& start) {
  if (!part.defined()) return;
  if (part.sym_size(dim) == weight.sym_size(dim)) {
    grad = std::move(part);
    return;
  }
  if (!grad.defined()) grad = at::empty_like(weight, at::MemoryFormat::Contiguous);
  grad.narrow_symint(dim, start, part.sym_size(dim)).copy_(part);
}

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
      c10::string_view backend,
      int64_t head_chunks) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check_block_inputs(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                       cu_seqlens, head_chunks);
    // The core is picked once (docs/design.md §10.1), from the dims q will have.
    const BlockDims d = block_dims(wq_b, kv_a, wkv_b, num_heads);
    const std::string core = resolve_core_name(q_a, d.nope, d.rope, d.v,
                                               cu_seqlens.has_value() && cu_seqlens->defined(), std::string(backend));
    auto [y, q_rstd, kv_rstd] = mla_attention_block_with_rstd(
        q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads, softmax_scale,
        q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens, max_seqlen, core, head_chunks);
    ctx->save_for_backward({q_a, q_norm_weight.value_or(at::Tensor()), wq_b, kv_a, kv_norm_weight, wkv_b, wo,
                            cos, sin, q_rstd, kv_rstd});
    ctx->saved_data["core"] = core;
    ctx->saved_data["has_bias"] = bo.has_value() && bo->defined();
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["head_chunks"] = head_chunks;
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
                                   sin, rope_interleave);
    const bool need_c_q = need(kQA) || need(kQNorm);
    const at::Tensor grad_y = std::move(grad_outputs[0]);
    const at::Tensor grad_y_rows = grad_y.reshape_symint({-1, grad_y.sym_size(-1)});
    if (need(kBo)) grads[kBo] = grad_y_rows.sum(0);
    // One head group at a time (docs/design.md §13.6): its q, out and the attention's transients
    // are recomputed, used and released before the next group's; the latent-side grads are summed
    // over the groups, the weights' grads are the groups' row (column, for wo) slices.
    at::Tensor grad_c_q, grad_kv_latent, grad_k_rope, grad_cos, grad_sin;
    const int64_t num_heads = ctx->saved_data["num_heads"].toInt();
    const BlockDims d = block_dims(wq_b, kv_a, wkv_b, num_heads);
    for (const HeadChunk& chunk :
         head_chunks_of(wq_b, wkv_b, wo, d, num_heads, ctx->saved_data["head_chunks"].toInt())) {
      ChunkQ q = chunk_q(l.c_q, chunk, cos, sin, rope_interleave);
      if (!need_rope) q.projected = at::Tensor();
      auto [out, lse, ignored] = mla_attention(q.q, l.kv_latent, l.k_rope, chunk.wkv_b, softmax_scale, causal,
                                               cu_seqlens, max_seqlen, core);
      // o_proj over the group's heads: y = out·woᵀ + bo, so dwo = dyᵀ·out and dout = dy·wo.
      if (need(kWo)) {
        place(grads[kWo], at::mm(grad_y_rows.t(), out.flatten(-2).reshape_symint({-1, chunk.wo.sym_size(1)})), wo, 1,
              d.v * chunk.first);
      }
      at::Tensor grad_out = at::matmul(grad_y, chunk.wo).view_symint(out.sym_sizes());
      auto [grad_q, grad_latent, grad_rope, grad_w] = mla_attention_backward(
          grad_out, q.q, l.kv_latent, l.k_rope, chunk.wkv_b, out, lse, softmax_scale, causal, cu_seqlens, max_seqlen,
          core);
      out = lse = grad_out = q.q = at::Tensor();
      place(grads[kWkvB], std::move(grad_w), wkv_b, 0, (d.nope + d.v) * chunk.first);
      accumulate(grad_kv_latent, std::move(grad_latent));
      accumulate(grad_k_rope, std::move(grad_rope));
      ExpandQGrads gq = expand_q_backward(grad_q, q.projected, l.c_q, chunk.wq_b, cos, sin, rope_interleave, need_c_q,
                                          need(kWqB), need_rope);
      place(grads[kWqB], std::move(gq.wq_b), wq_b, 0, (d.nope + d.rope) * chunk.first);
      accumulate(grad_c_q, std::move(gq.q_latent));
      accumulate(grad_cos, std::move(gq.cos));
      accumulate(grad_sin, std::move(gq.sin));
    }
    l.c_q = l.kv_latent = l.k_rope = at::Tensor();

    if (need_c_q && q_norm_weight) {
      RmsNormGrads gn = rms_norm_backward(grad_c_q, q_a, *q_norm_weight, q_rstd, need(kQA), need(kQNorm));
      grads[kQA] = gn.x;
      grads[kQNorm] = gn.weight;
    } else {
      grads[kQA] = grad_c_q;
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
      grads[kCos] = grad_cos.add(gk.cos);
      grads[kSin] = grad_sin.add(gk.sin);
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
    c10::string_view backend,
    int64_t head_chunks) {
  return MlaAttentionBlockFunction::apply(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin,
                                          num_heads, softmax_scale, q_norm_eps, kv_norm_eps, causal,
                                          rope_interleave, cu_seqlens, std::move(max_seqlen), backend, head_chunks);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("mla_attention_block", TORCH_FN(mla_attention_block_autograd));
}

}  // namespace torch_mla
