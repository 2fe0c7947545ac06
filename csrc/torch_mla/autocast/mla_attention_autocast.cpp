// Autocast for mla_attention: inside torch.autocast the op runs in the autocast dtype, as the
// linear layers around it do (a float32 RMSNorm output or parameter is cast), with autocast
// switched off below it. The backward needs no autocast kernel: its kernels compute in the
// dtype of the tensors the forward saved (KernelDtypeGuard).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "torch_mla/mla_attention.h"

namespace torch_mla {
namespace {

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor> mla_attention_autocast(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  return mla_attention(cast(q), cast(kv_latent), cast(k_rope), cast(wkv_b), softmax_scale, causal,
                       cu_seqlens, std::move(max_seqlen));
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, AutocastCPU, m) {
  m.impl("mla_attention", TORCH_FN(mla_attention_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(torch_mla, Autocast, m) {
  m.impl("mla_attention", TORCH_FN(mla_attention_autocast<c10::DeviceType::CUDA>));
}

}  // namespace torch_mla
