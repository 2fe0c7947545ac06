#include "torch_mla/layer/indexer_checks.h"

#include <c10/util/Exception.h>

#include <string>

namespace torch_mla {
namespace {

constexpr const char* kOp = "torch_mla.dsa_indexer_topk: ";

const char* layout(const std::string& arg, bool varlen) {
  if (arg == "index_q") return varlen ? "(T, H_I, D_I)" : "(B, S, H_I, D_I)";
  if (arg == "index_k") return varlen ? "(T, D_I)" : "(B, S, D_I)";
  return varlen ? "(T, H_I)" : "(B, S, H_I)";  // weights
}

const char* mode(bool varlen) { return varlen ? " (packed, cu_seqlens given)" : " (padded batch)"; }

void check_rank(const at::Tensor& t, const char* arg, int64_t rank, bool varlen) {
  TORCH_CHECK_VALUE(t.dim() == rank, kOp, arg, " must have shape ", layout(arg, varlen), mode(varlen), ", got a ",
                    t.dim(), "-D tensor of shape ", t.sym_sizes());
}

void check_size(const at::Tensor& t, const char* arg, int64_t d, const c10::SymInt& expected, const char* what,
                bool varlen) {
  TORCH_CHECK_VALUE(t.sym_size(d) == expected, kOp, arg, " must have shape ", layout(arg, varlen), " with ", what,
                    " = ", expected, ", got shape ", t.sym_sizes());
}

void check_like_q(const at::Tensor& t, const char* arg, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), kOp, arg, " must have the same dtype as index_q (",
                    q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, arg, " must be on the same device as index_q (", q.device(),
                    "), got ", t.device());
}

}  // namespace

IndexerDims check_indexer_inputs(const at::Tensor& index_q, const at::Tensor& index_k, const at::Tensor& weights,
                                 const c10::SymInt& topk, const std::optional<at::Tensor>& cu_seqlens,
                                 const c10::SymInt& max_seqlen) {
  TORCH_CHECK_VALUE(index_q.defined() && index_k.defined() && weights.defined(), kOp,
                    "index_q, index_k and weights must be defined tensors");
  const auto dtype = index_q.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    kOp, "index_q must be float64, float32, bfloat16 or float16, got ", dtype);
  check_like_q(index_k, "index_k", index_q);
  check_like_q(weights, "weights", index_q);
  TORCH_CHECK_VALUE(topk >= 1, kOp, "topk must be at least 1, got ", topk);
  TORCH_CHECK_VALUE(max_seqlen >= 0, kOp, "max_seqlen must be 0 (not given) or the length of the longest ",
                    "sequence or more, got ", max_seqlen);

  IndexerDims d;
  d.varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  const int64_t lead = d.varlen ? 1 : 2;  // leading token dimensions: (T,) or (B, S)
  check_rank(index_q, "index_q", lead + 2, d.varlen);
  check_rank(index_k, "index_k", lead + 1, d.varlen);
  check_rank(weights, "weights", lead + 1, d.varlen);
  d.heads = index_q.sym_size(lead);
  d.dim = index_q.sym_size(lead + 1);
  TORCH_CHECK_VALUE(d.heads >= 1 && d.dim >= 1, kOp, "index_q must have shape ", layout("index_q", d.varlen),
                    " with H_I >= 1 and D_I >= 1, got shape ", index_q.sym_sizes());
  if (d.varlen) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, kOp, "cu_seqlens must be int32, got ", cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.sym_size(0) >= 1, kOp,
                      "cu_seqlens must be a 1-D tensor of shape (B+1,), got shape ", cu.sym_sizes());
    TORCH_CHECK_VALUE(cu.device() == index_q.device(), kOp, "cu_seqlens must be on the same device as index_q (",
                      index_q.device(), "), got ", cu.device());
    d.batch = cu.sym_size(0) - 1;
    d.tokens = index_q.sym_size(0);
    d.seqlen = 0;
  } else {
    d.batch = index_q.sym_size(0);
    d.seqlen = index_q.sym_size(1);
    d.tokens = d.batch * d.seqlen;
  }
  for (int64_t i = 0; i < lead; ++i) {
    const char* what = d.varlen ? "T (from index_q)" : (i == 0 ? "B (from index_q)" : "S (from index_q)");
    check_size(index_k, "index_k", i, index_q.sym_size(i), what, d.varlen);
    check_size(weights, "weights", i, index_q.sym_size(i), what, d.varlen);
  }
  check_size(index_k, "index_k", lead, d.dim, "D_I (from index_q)", d.varlen);
  check_size(weights, "weights", lead, d.heads, "H_I (from index_q)", d.varlen);
  return d;
}

}  // namespace torch_mla
