// Autocast for mla_attention_q_latent (the rule: autocast.h). cos and sin keep their precision:
// the rotation is computed in float anyway.
#include <torch/library.h>

#include "torch_mla/ops/autocast/autocast.h"
#include "torch_mla/ops/mla_attention_q_latent.h"

namespace torch_mla {
namespace {

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_q_latent_autocast(
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
  const AutocastScope<device_type> scope;
  return mla_attention_q_latent(scope.cast(q_latent), scope.cast(wq_b), cos, sin, scope.cast(kv_latent),
                                scope.cast(k_rope), scope.cast(wkv_b), num_heads, softmax_scale, causal,
                                rope_interleave, cu_seqlens, std::move(max_seqlen), core, return_max_logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, AutocastCPU, m) {
  m.impl("mla_attention_q_latent", TORCH_FN(mla_attention_q_latent_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(torch_mla, Autocast, m) {
  m.impl("mla_attention_q_latent", TORCH_FN(mla_attention_q_latent_autocast<c10::DeviceType::CUDA>));
}

}  // namespace torch_mla
