#include "torch_mla/layer/sparse_checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace torch_mla {
void check_topk_layout(const at::Tensor& lead, const char* lead_name, const at::Tensor& topk_indices, bool varlen,
                       const char* op) {
  const char* shape = varlen ? "(T, k)" : "(B, S, k)";
  TORCH_CHECK_VALUE(topk_indices.defined(), op, "topk_indices must be a defined tensor");
  TORCH_CHECK_VALUE(topk_indices.scalar_type() == at::kInt, op, "topk_indices must be int32 of shape ", shape,
                    ", got ", topk_indices.scalar_type());
  TORCH_CHECK_VALUE(topk_indices.device() == lead.device(), op, "topk_indices must be on the same device as ",
                    lead_name, " (", lead.device(), "), got ", topk_indices.device());
  const int64_t rank = varlen ? 2 : 3;
  TORCH_CHECK_VALUE(topk_indices.dim() == rank, op, "topk_indices must have shape ", shape,
                    varlen ? " (packed, cu_seqlens given)" : " (padded batch)", ", got a ", topk_indices.dim(),
                    "-D tensor of shape ", topk_indices.sym_sizes());
  for (int64_t i = 0; i < rank - 1; ++i) {
    TORCH_CHECK_VALUE(topk_indices.sym_size(i) == lead.sym_size(i), op, "topk_indices must have shape ", shape,
                      " with ", varlen ? "T" : (i == 0 ? "B" : "S"), " = ", lead.sym_size(i), " (from ", lead_name,
                      "), got shape ", topk_indices.sym_sizes());
  }
}

SparseDims check_sparse_inputs(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                               const at::Tensor& wkv_b, const at::Tensor& topk_indices,
                               const std::optional<at::Tensor>& cu_seqlens) {
  SparseDims s;
  s.mla = naming_errors_as(kSparseOp, [&] { return check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens); });
  check_topk_layout(q, "q", topk_indices, s.mla.varlen, kSparseOp);
  s.topk = topk_indices.sym_size(-1);
  return s;
}

SparseDims check_sparse_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv_latent,
                                        const at::Tensor& k_rope, const at::Tensor& wkv_b,
                                        const at::Tensor& topk_indices, const at::Tensor& out, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& cu_seqlens) {
  SparseDims s;
  s.mla = naming_errors_as(kSparseOp, [&] {
    return check_mla_backward_inputs(grad_out, q, kv_latent, k_rope, wkv_b, out, lse, cu_seqlens);
  });
  check_topk_layout(q, "q", topk_indices, s.mla.varlen, kSparseOp);
  s.topk = topk_indices.sym_size(-1);
  return s;
}

bool check_topk_values_on_host(const at::Tensor& topk_indices, const Sequences& seqs) {
  TORCH_INTERNAL_ASSERT(topk_indices.is_cpu() && seqs.has_spans(), "check_topk_values_on_host takes host data");
  const at::Tensor idx = topk_indices.reshape({seqs.tokens, -1}).contiguous();
  const int64_t k = idx.size(1);
  const int32_t* v = idx.data_ptr<int32_t>();
  // mark[p] == the row's stamp: position p already seen in this row (no clearing between rows).
  std::vector<int64_t> mark(static_cast<size_t>(seqs.longest), -1);
  bool covers_prefix = true;
  for (int64_t b = 0; b < seqs.count; ++b) {
    const SeqSpan span = seqs.spans[b];
    for (int64_t t = 0; t < span.len; ++t) {
      const int64_t row = span.begin + t;
      int64_t selected = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = v[row * k + j];
        if (e == -1) continue;
        // The row as the user indexes it: [b, s] padded, [t] packed.
        const auto where = [&] {
          return seqs.packed ? "topk_indices[" + std::to_string(row) + "] (sequence " + std::to_string(b) +
                                   ", position " + std::to_string(t) + ")"
                             : "topk_indices[" + std::to_string(b) + ", " + std::to_string(t) + "]";
        };
        TORCH_CHECK_VALUE(e >= 0 && e < span.len, kSparseOp, where(), " holds ", e,
                          ", outside its sequence of length ", span.len,
                          ": entries must be -1 (none) or a position in the query's own sequence");
        TORCH_CHECK_VALUE(mark[e] != row, kSparseOp, where(), " holds ", e,
                          " twice: a row's entries must be distinct (only -1 may repeat)");
        mark[e] = row;
        selected += e <= t ? 1 : 0;
      }
      // Distinct entries ≤ t number t + 1 exactly when they are the whole prefix 0..t.
      covers_prefix = covers_prefix && selected == t + 1;
    }
  }
  return covers_prefix;
}

void assert_topk_values_on_device(const at::Tensor& topk_indices, const at::Tensor& rows_len) {
  const at::Tensor idx = topk_indices.reshape({rows_len.size(0), -1}).to(at::kLong);
  const at::Tensor in_range = (idx.ge(-1) & idx.lt(rows_len.unsqueeze(1))).all();
  const at::Tensor sorted = std::get<0>(idx.sort(1));
  const int64_t k = idx.size(1);
  const at::Tensor repeated = k > 1 ? (sorted.narrow(1, 1, k - 1).eq(sorted.narrow(1, 0, k - 1)) &
                                       sorted.narrow(1, 1, k - 1).ge(0)).any()
                                    : at::zeros({}, idx.options().dtype(at::kBool));
  at::_assert_async(in_range & repeated.logical_not(),
                    "torch_mla.mla_sparse_attention: topk_indices holds an entry outside its query's sequence or "
                    "a repeated entry (checked on the device, without the row: run on CPU tensors to see it)");
}

}  // namespace torch_mla
