// The Meta kernel of dsa_indexer_topk: output shapes and dtypes exactly as the device kernel makes
// them (contiguous), with symbolic sizes for torch.compile's dynamic shapes.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/indexer_checks.h"

namespace torch_mla {
namespace {

std::tuple<at::Tensor, at::Tensor> dsa_indexer_topk_meta(const at::Tensor& index_q, const at::Tensor& index_k,
                                                         const at::Tensor& weights, int64_t topk,
                                                         const std::optional<at::Tensor>& cu_seqlens,
                                                         c10::SymInt max_seqlen) {
  check_indexer_inputs(index_q, index_k, weights, topk, cu_seqlens, max_seqlen);
  std::vector<c10::SymInt> shape(index_q.sym_sizes().begin(), index_q.sym_sizes().end() - 1);
  shape.back() = topk;
  return {at::empty_symint(shape, index_q.options().dtype(at::kInt)),
          at::empty_symint(shape, index_q.options().dtype(lse_dtype(index_q.scalar_type())))};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Meta, m) {
  m.impl("dsa_indexer_topk", TORCH_FN(dsa_indexer_topk_meta));
}

}  // namespace torch_mla
