// Autocast for mla_attention_block (the rule: autocast.h). The norm weights, cos and sin keep
// their precision: the norms and the rotation compute in float anyway, and the norms' outputs are
// cast to the projections' dtype inside, as autocast's linear casts an RMSNorm's float32 output;
// topk_indices is never cast.
#include <torch/library.h>

#include "torch_mla/ops/autocast/autocast.h"
#include "torch_mla/ops/mla_attention_block.h"

namespace torch_mla {
namespace {

template <c10::DeviceType device_type>
at::Tensor mla_attention_block_autocast(
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
  const AutocastScope<device_type> scope;
  const std::optional<at::Tensor> bias =
      bo.has_value() && bo->defined() ? std::optional<at::Tensor>(scope.cast(*bo)) : std::nullopt;
  return mla_attention_block(scope.cast(q_a), q_norm_weight, scope.cast(wq_b), scope.cast(kv_a), kv_norm_weight,
                             scope.cast(wkv_b), scope.cast(wo), bias, cos, sin, num_heads, softmax_scale,
                             q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens, std::move(max_seqlen),
                             core, head_chunks, topk_indices);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, AutocastCPU, m) {
  m.impl("mla_attention_block", TORCH_FN(mla_attention_block_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(torch_mla, Autocast, m) {
  m.impl("mla_attention_block", TORCH_FN(mla_attention_block_autocast<c10::DeviceType::CUDA>));
}

}  // namespace torch_mla
