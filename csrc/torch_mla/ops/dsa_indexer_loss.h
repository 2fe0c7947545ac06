#pragma once
// The dsa_indexer_loss op (docs/design.md §18) and its backward as C++ functions through the
// dispatcher: Autograd (autograd/), Autocast (autocast/), Meta (meta/), CPU and CUDA (device/).
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace torch_mla {

// The per-query KL divergence between the main attention's head-summed, L1-normalised
// probabilities (the teacher, detached) and the softmax of the indexer's scores, over every visible
// key (dense mode) or the selected keys (topk_indices given).
//   index_q (B, S, H_I, D_I) | (T, H_I, D_I), index_k (B, S, D_I) | (T, D_I),
//   weights (B, S, H_I) | (T, H_I): the indexer's tensors as dsa_indexer_topk takes them;
//   q, kv_latent, k_rope, wkv_b, cu_seqlens, max_seqlen as mla_attention takes them, lse its
//   (B, S, H) | (T, H) lse; topk_indices int32 (B, S, k) | (T, k) as mla_sparse_attention takes it
//   returns kl (B, S) | (T,) in lse's dtype (float32, float64 for float64 q)
at::Tensor dsa_indexer_loss(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                            const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                            const at::Tensor& wkv_b, const at::Tensor& lse, double softmax_scale,
                            const std::optional<at::Tensor>& topk_indices,
                            const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen);

// Returns (grad_index_q, grad_index_k, grad_weights), each shaped like its input; the teacher's
// inputs get none.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dsa_indexer_loss_backward(
    const at::Tensor& grad_kl, const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& lse, double softmax_scale, const std::optional<at::Tensor>& topk_indices,
    const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen);

}  // namespace torch_mla
