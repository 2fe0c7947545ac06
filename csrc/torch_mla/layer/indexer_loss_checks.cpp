#include "torch_mla/layer/indexer_loss_checks.h"

#include <c10/util/Exception.h>

#include "torch_mla/layer/sparse_checks.h"

namespace torch_mla {
namespace {

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

const char* mode(bool varlen) { return varlen ? " (packed, cu_seqlens given)" : " (padded batch)"; }

// lse (B, S, H) | (T, H): the shape of q without its last dimension, in q's statistics dtype.
void check_lse(const at::Tensor& lse, const at::Tensor& q, const MlaDims& d) {
  const char* shape = d.varlen ? "(T, H)" : "(B, S, H)";
  TORCH_CHECK_VALUE(lse.defined(), kIndexerLossOp, "lse must be a defined tensor of shape ", shape);
  const auto expected = lse_dtype(q.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == expected, kIndexerLossOp, "lse must be ", expected, " (the dtype ",
                    "mla_attention returns it in for ", q.scalar_type(), " q), got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), kIndexerLossOp, "lse must be on the same device as q (", q.device(),
                    "), got ", lse.device());
  const c10::SymIntArrayRef lead = q.sym_sizes().slice(0, q.dim() - 1);
  TORCH_CHECK_VALUE(lse.sym_sizes() == lead, kIndexerLossOp, "lse must have shape ", shape, mode(d.varlen), " = ",
                    lead, " (from q), got shape ", lse.sym_sizes());
}

// The indexer's tensors describe the same tokens as the teacher's.
void check_same_tokens(const at::Tensor& index_q, const at::Tensor& q, const IndexerDims& index) {
  TORCH_CHECK_VALUE(index_q.device() == q.device(), kIndexerLossOp, "index_q must be on the same device as q (",
                    q.device(), "), got ", index_q.device());
  const int64_t lead = index.varlen ? 1 : 2;
  for (int64_t i = 0; i < lead; ++i) {
    TORCH_CHECK_VALUE(index_q.sym_size(i) == q.sym_size(i), kIndexerLossOp, "index_q must have shape ",
                      index.varlen ? "(T, H_I, D_I)" : "(B, S, H_I, D_I)", " with ",
                      index.varlen ? "T" : (i == 0 ? "B" : "S"), " = ", q.sym_size(i), " (from q), got shape ",
                      index_q.sym_sizes());
  }
}

}  // namespace

IndexerLossDims check_indexer_loss_inputs(const at::Tensor& index_q, const at::Tensor& index_k,
                                          const at::Tensor& weights, const at::Tensor& q, const at::Tensor& kv_latent,
                                          const at::Tensor& k_rope, const at::Tensor& wkv_b, const at::Tensor& lse,
                                          const std::optional<at::Tensor>& topk_indices,
                                          const std::optional<at::Tensor>& cu_seqlens, const c10::SymInt& max_seqlen) {
  IndexerLossDims d;
  // topk = 1: dsa_indexer_topk's own k, which this op does not take.
  d.index = naming_errors_as(kIndexerLossOp, [&] {
    return check_indexer_inputs(index_q, index_k, weights, 1, cu_seqlens, max_seqlen);
  });
  d.sparse = has(topk_indices);
  if (d.sparse) {
    const SparseDims s = naming_errors_as(kIndexerLossOp, [&] {
      return check_sparse_inputs(q, kv_latent, k_rope, wkv_b, *topk_indices, cu_seqlens);
    });
    d.mla = s.mla;
    d.topk = s.topk;
  } else {
    d.mla = naming_errors_as(kIndexerLossOp, [&] { return check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens); });
    d.topk = 0;
  }
  check_same_tokens(index_q, q, d.index);
  check_lse(lse, q, d.mla);
  return d;
}

IndexerLossDims check_indexer_loss_backward_inputs(
    const at::Tensor& grad_kl, const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& lse, const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& cu_seqlens,
    const c10::SymInt& max_seqlen) {
  const IndexerLossDims d = check_indexer_loss_inputs(index_q, index_k, weights, q, kv_latent, k_rope, wkv_b, lse,
                                                      topk_indices, cu_seqlens, max_seqlen);
  const char* shape = d.index.varlen ? "(T,)" : "(B, S)";
  TORCH_CHECK_VALUE(grad_kl.defined() && grad_kl.scalar_type() == lse.scalar_type(), kIndexerLossOp,
                    "grad_kl must be a ", lse.scalar_type(), " tensor of shape ", shape);
  TORCH_CHECK_VALUE(grad_kl.device() == q.device(), kIndexerLossOp, "grad_kl must be on the same device as q (",
                    q.device(), "), got ", grad_kl.device());
  const c10::SymIntArrayRef lead = lse.sym_sizes().slice(0, lse.dim() - 1);
  TORCH_CHECK_VALUE(grad_kl.sym_sizes() == lead, kIndexerLossOp, "grad_kl must have shape ", shape, " = ", lead,
                    ", got shape ", grad_kl.sym_sizes());
  return d;
}

}  // namespace torch_mla
