#pragma once
// The dsa_indexer_topk op (docs/design.md §17): the DSA lightning indexer's scores and their top k
// per query, streamed over query blocks. Not differentiable.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torch_mla {

// The dispatcher op torch_mla::dsa_indexer_topk.
//   index_q (B, S, H_I, D_I) | (T, H_I, D_I), index_k (B, S, D_I) | (T, D_I),
//   weights (B, S, H_I) | (T, H_I), cu_seqlens (B+1,) int32 for the packed layout,
//   max_seqlen: a bound on every sequence's length, checked (0: not given)
//   returns indices (B, S, topk) | (T, topk) int32, positions within the query's own sequence
//   (score descending, then position ascending; -1 past the visible keys), and scores of the same
//   shape in float32 (float64 for float64 inputs), -inf where the index is -1.
std::tuple<at::Tensor, at::Tensor> dsa_indexer_topk(const at::Tensor& index_q, const at::Tensor& index_k,
                                                    const at::Tensor& weights, int64_t topk,
                                                    const std::optional<at::Tensor>& cu_seqlens,
                                                    int64_t max_seqlen);

}  // namespace torch_mla
