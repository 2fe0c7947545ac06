// Autograd for mla_attention_block, registered at the Autograd key (every device), docs/design.md §13.
// The forward saves only the block's inputs (q_a, kv_a, cos, sin, the weights, and topk_indices
// when given: the DSA block, §13.7) and the norms' per-row rstd; the backward is layer/block.h's
// block_backward through the core the forward ran.
#include <torch/autograd.h>
#include <torch/library.h>

#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/cores/table.h"
#include "torch_mla/layer/block.h"
#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/sequences.h"
#include "torch_mla/ops/adapters.h"
#include "torch_mla/ops/mla_attention_block.h"

namespace torch_mla {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The schema's argument count (tensors first: BlockInput).
constexpr int64_t kNumArgs = 21;

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
      c10::string_view core,
      int64_t head_chunks,
      const std::optional<at::Tensor>& topk_indices) {
    at::AutoDispatchBelowADInplaceOrView guard;
    BlockArgs args{q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin,
                   num_heads, softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave,
                   cu_seqlens, max_seqlen, std::string(core), head_chunks, topk_indices};
    check_block_inputs(args);
    const bool sparse = topk_indices.has_value() && topk_indices->defined();
    // The core is picked once (docs/design.md §10.1), from the dims q will have; a sparse block
    // picks a sparse core (or "auto", the sparse layer's rule, §16.4), which reads cu_seqlens itself.
    const BlockDims d = block_dims(args);
    const std::string resolved = naming_errors_as("torch_mla.mla_attention_block: ", [&] {
      return sparse ? resolve_sparse_core(args.core)
                    : resolve_core_name(q_a, d.nope, d.rope, d.v,
                                        args.cu_seqlens.has_value() && args.cu_seqlens->defined(), args.core);
    });
    if (!sparse) {
      max_seqlen = naming_errors_as("torch_mla.mla_attention_block: ", [&] {
        return known_max_seqlen(cu_seqlens, q_a.sym_size(0), std::move(max_seqlen), resolved);
      });
    }
    auto [y, q_rstd, kv_rstd] = mla_attention_block_with_rstd(
        q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads, softmax_scale,
        q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens, max_seqlen, resolved, head_chunks,
        topk_indices);
    ctx->save_for_backward({q_a, q_norm_weight.value_or(at::Tensor()), wq_b, kv_a, kv_norm_weight, wkv_b, wo,
                            cos, sin, q_rstd, kv_rstd, topk_indices.value_or(at::Tensor())});
    ctx->saved_data["core"] = resolved;
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
    variable_list grads(kNumArgs);
    if (!grad_outputs[0].defined()) return grads;
    // The saved tensors already have the dtype autocast chose in the forward; a backward called
    // inside torch.autocast must not recast them.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    BlockArgs args;
    args.q_a = saved[0];
    if (saved[1].defined()) args.q_norm_weight = saved[1];
    args.wq_b = saved[2];
    args.kv_a = saved[3];
    args.kv_norm_weight = saved[4];
    args.wkv_b = saved[5];
    args.wo = saved[6];
    args.cos = saved[7];
    args.sin = saved[8];
    args.num_heads = ctx->saved_data["num_heads"].toInt();
    args.softmax_scale = ctx->saved_data["softmax_scale"].toDouble();
    args.causal = ctx->saved_data["causal"].toBool();
    args.rope_interleave = ctx->saved_data["rope_interleave"].toBool();
    args.cu_seqlens = ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>();
    args.max_seqlen = ctx->saved_data["max_seqlen"].toSymInt();
    args.core = ctx->saved_data["core"].toStringRef();
    args.head_chunks = ctx->saved_data["head_chunks"].toInt();
    if (saved[11].defined()) args.topk_indices = saved[11];
    // needs_input_grad counts only the tensors given: an absent optional (q_norm_weight, bo)
    // shifts the inputs after it.
    const bool has_q_norm = args.q_norm_weight.has_value(), has_bias = ctx->saved_data["has_bias"].toBool();
    std::array<bool, kNumBlockTensors> need{};
    for (int i = 0; i < kNumBlockTensors; ++i) {
      const bool absent = (i == kQNorm && !has_q_norm) || (i == kBo && !has_bias);
      need[i] = !absent && ctx->needs_input_grad(i - (i > kQNorm && !has_q_norm) - (i > kBo && !has_bias));
    }
    const auto block_grads = block_backward(args, saved[9], saved[10], std::move(grad_outputs[0]), need);
    std::copy(block_grads.begin(), block_grads.end(), grads.begin());
    return grads;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Autograd, m) {
  m.impl("mla_attention_block", TORCH_FN((ApplyOf<decltype(mla_attention_block), MlaAttentionBlockFunction>::call)));
}

}  // namespace torch_mla
