// Autocast for mla_attention_q_latent: inside torch.autocast the op runs in the autocast dtype,
// as the linear layers around it do (the float32 RMSNorm outputs and parameters are cast), with
// autocast switched off below so that every kernel it reaches sees one dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "torch_mla/q_latent/mla_attention_q_latent.h"

namespace torch_mla {
namespace {

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor> mla_attention_q_latent_autocast(
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
    c10::SymInt max_seqlen) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  // cos and sin keep their precision: the rotation is computed in float anyway.
  return mla_attention_q_latent(cast(q_latent), cast(wq_b), cos, sin, cast(kv_latent), cast(k_rope),
                                cast(wkv_b), num_heads, softmax_scale, causal, rope_interleave,
                                cu_seqlens, std::move(max_seqlen));
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, AutocastCPU, m) {
  m.impl("mla_attention_q_latent", TORCH_FN(mla_attention_q_latent_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(torch_mla, Autocast, m) {
  m.impl("mla_attention_q_latent", TORCH_FN(mla_attention_q_latent_autocast<c10::DeviceType::CUDA>));
}

}  // namespace torch_mla
