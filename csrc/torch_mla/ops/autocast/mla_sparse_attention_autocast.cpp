// Autocast for mla_sparse_attention (the rule: autocast.h); topk_indices is never cast.
#include <torch/library.h>

#include "torch_mla/ops/autocast/autocast.h"
#include "torch_mla/ops/mla_sparse_attention.h"

namespace torch_mla {
namespace {

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_autocast(
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& topk_indices, double softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen, c10::string_view core, bool return_max_logits) {
  const AutocastScope<device_type> scope;
  return mla_sparse_attention(scope.cast(q), scope.cast(kv_latent), scope.cast(k_rope), scope.cast(wkv_b),
                              topk_indices, softmax_scale, cu_seqlens, std::move(max_seqlen), core,
                              return_max_logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, AutocastCPU, m) {
  m.impl("mla_sparse_attention", TORCH_FN(mla_sparse_attention_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(torch_mla, Autocast, m) {
  m.impl("mla_sparse_attention", TORCH_FN(mla_sparse_attention_autocast<c10::DeviceType::CUDA>));
}

}  // namespace torch_mla
