// Autocast for dsa_indexer_loss (the rule: autocast.h): the indexer's and the teacher's tensors run
// in the autocast dtype, which the kernel accumulates in float32; lse (already float32) and
// topk_indices are never cast.
#include <torch/library.h>

#include "torch_mla/ops/autocast/autocast.h"
#include "torch_mla/ops/dsa_indexer_loss.h"

namespace torch_mla {
namespace {

template <c10::DeviceType device_type>
at::Tensor dsa_indexer_loss_autocast(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                                     const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                                     const at::Tensor& wkv_b, const at::Tensor& lse, double softmax_scale,
                                     const std::optional<at::Tensor>& topk_indices,
                                     const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen) {
  const AutocastScope<device_type> scope;
  return dsa_indexer_loss(scope.cast(index_q), scope.cast(index_k), scope.cast(weights), scope.cast(q),
                          scope.cast(kv_latent), scope.cast(k_rope), scope.cast(wkv_b), lse, softmax_scale,
                          topk_indices, cu_seqlens, std::move(max_seqlen));
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, AutocastCPU, m) {
  m.impl("dsa_indexer_loss", TORCH_FN(dsa_indexer_loss_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(torch_mla, Autocast, m) {
  m.impl("dsa_indexer_loss", TORCH_FN(dsa_indexer_loss_autocast<c10::DeviceType::CUDA>));
}

}  // namespace torch_mla
