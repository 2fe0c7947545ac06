#pragma once
// Argument checks of dsa_indexer_loss (docs/design.md §18), shared by its device and Meta kernels;
// never reads tensor data: the indexer's tensors as dsa_indexer_topk checks them, the teacher's as
// mla_attention (dense mode) or mla_sparse_attention (sparse mode, topk_indices given) check them,
// and lse, all renamed to this op.
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/indexer_checks.h"

namespace torch_mla {

inline constexpr const char* kIndexerLossOp = "torch_mla.dsa_indexer_loss: ";

struct IndexerLossDims {
  IndexerDims index;  // B, S | T, H_I, D_I
  MlaDims mla;        // H, Dn, Dr, Dv, Dc of the teacher
  bool sparse = false;
  c10::SymInt topk;   // k of topk_indices; 0 in dense mode
};

// index_q (B, S, H_I, D_I) | (T, H_I, D_I), index_k (B, S, D_I) | (T, D_I), weights (B, S, H_I) |
// (T, H_I); q, kv_latent, k_rope, wkv_b as mla_attention takes them, with q's leading dimensions
// those of index_q and on its device; lse (B, S, H) | (T, H) in float32 (float64 for float64 q);
// topk_indices, when given, int32 (B, S, k) | (T, k); cu_seqlens (B+1,) int32; max_seqlen >= 0.
// Errors are ValueErrors naming the argument and its expected shape or dtype.
IndexerLossDims check_indexer_loss_inputs(const at::Tensor& index_q, const at::Tensor& index_k,
                                          const at::Tensor& weights, const at::Tensor& q, const at::Tensor& kv_latent,
                                          const at::Tensor& k_rope, const at::Tensor& wkv_b, const at::Tensor& lse,
                                          const std::optional<at::Tensor>& topk_indices,
                                          const std::optional<at::Tensor>& cu_seqlens, const c10::SymInt& max_seqlen);

// Additionally grad_kl: (B, S) | (T,) in lse's dtype.
IndexerLossDims check_indexer_loss_backward_inputs(
    const at::Tensor& grad_kl, const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& lse, const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& cu_seqlens,
    const c10::SymInt& max_seqlen);

}  // namespace torch_mla
