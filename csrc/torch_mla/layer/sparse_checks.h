#pragma once
// Argument checks of mla_sparse_attention (docs/design.md §16.3), written once for every core and
// the Meta kernels: mla_attention's checks (checks.h) renamed to this op, plus topk_indices.
#include <ATen/core/Tensor.h>

#include <optional>

#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/sequences.h"

namespace torch_mla {

inline constexpr const char* kSparseOp = "torch_mla.mla_sparse_attention: ";

struct SparseDims {
  MlaDims mla;
  c10::SymInt topk;  // k, topk_indices' last dimension
};

// Shapes, dtypes and devices of the forward arguments (never data): mla_attention's checks, and
// topk_indices int32 (B, S, k) | (T, k) on q's device.
SparseDims check_sparse_inputs(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                               const at::Tensor& wkv_b, const at::Tensor& topk_indices,
                               const std::optional<at::Tensor>& cu_seqlens);

// topk_indices' dtype, device and shape against `lead`, the tensor named `lead_name` whose leading
// (B, S) | (T,) dimensions it shares; a ValueError starting with `op` otherwise. The layout part of
// check_sparse_inputs, also run by the DSA block (docs/design.md §13.7) against q_a.
void check_topk_layout(const at::Tensor& lead, const char* lead_name, const at::Tensor& topk_indices, bool varlen,
                       const char* op);

// Additionally grad_out, out and lse against the forward arguments.
SparseDims check_sparse_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv_latent,
                                        const at::Tensor& k_rope, const at::Tensor& wkv_b,
                                        const at::Tensor& topk_indices, const at::Tensor& out, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& cu_seqlens);

// The entries of a host (CPU) topk_indices viewed (T, k), against the sequences (with spans): each
// is −1 or a position in the query's own sequence, and no position repeats within a row; a
// ValueError names the first row that breaks this. Returns whether every row selects exactly its
// whole causal prefix (the dense shortcut, §16.5).
bool check_topk_values_on_host(const at::Tensor& topk_indices, const Sequences& seqs);

// The same rule on a CUDA tensor without a host sync (§16.3): one device-side assert, which
// cannot name the row. rows_len (T,) int64 is each query's sequence length.
void assert_topk_values_on_device(const at::Tensor& topk_indices, const at::Tensor& rows_len);

}  // namespace torch_mla
