#pragma once
// Argument checks and shape inference for dsa_indexer_topk (docs/design.md §17), shared by its
// device and Meta kernels; never reads tensor data.
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

namespace torch_mla {

// Sizes of one dsa_indexer_topk call. Padded: index_q (B, S, H_I, D_I); packed: (T, H_I, D_I).
struct IndexerDims {
  bool varlen = false;
  c10::SymInt batch;    // B (padded) or cu_seqlens.size(0) - 1 (packed)
  c10::SymInt seqlen;   // S (padded); 0 when packed
  c10::SymInt tokens;   // B * S or T
  c10::SymInt heads;    // H_I
  c10::SymInt dim;      // D_I
};

// Checks ranks, sizes, dtypes and devices of index_q (B, S, H_I, D_I) | (T, H_I, D_I), index_k
// (B, S, D_I) | (T, D_I), weights (B, S, H_I) | (T, H_I), cu_seqlens (B+1,) int32, topk >= 1 and
// max_seqlen >= 0. Errors are ValueErrors that name the argument and its expected shape or dtype.
IndexerDims check_indexer_inputs(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                                 const c10::SymInt& topk, const std::optional<at::Tensor>& cu_seqlens,
                                 const c10::SymInt& max_seqlen);

}  // namespace torch_mla
