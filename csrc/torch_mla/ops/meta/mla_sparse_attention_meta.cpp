// Meta kernels of mla_sparse_attention: shapes and dtypes as the device kernels produce them (all
// contiguous), symbolic for torch.compile's dynamic shapes.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/layer/sparse_checks.h"

namespace torch_mla {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_meta(
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& topk_indices, double /*softmax_scale*/, const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen, c10::string_view core, bool return_max_logits) {
  const SparseDims s = check_sparse_inputs(q, kv_latent, k_rope, wkv_b, topk_indices, cu_seqlens);
  naming_errors_as(kSparseOp, [&] { check_max_seqlen_arg(max_seqlen); });
  resolve_sparse_core(std::string(core));
  std::vector<c10::SymInt> out_shape(q.sym_sizes().begin(), q.sym_sizes().end());
  out_shape.back() = s.mla.dim_v;
  std::vector<c10::SymInt> lse_shape(q.sym_sizes().begin(), q.sym_sizes().end() - 1);
  const auto stats = q.options().dtype(lse_dtype(q.scalar_type()));
  const std::vector<c10::SymInt> max_logits_shape{return_max_logits ? s.mla.heads : c10::SymInt(0)};
  return {at::empty_symint(out_shape, q.options()), at::empty_symint(lse_shape, stats),
          at::empty_symint(max_logits_shape, stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
    const at::Tensor& wkv_b, const at::Tensor& topk_indices, const at::Tensor& out, const at::Tensor& lse,
    double /*softmax_scale*/, const std::optional<at::Tensor>& cu_seqlens, c10::SymInt max_seqlen,
    c10::string_view /*core*/) {
  check_sparse_backward_inputs(grad_out, q, kv_latent, k_rope, wkv_b, topk_indices, out, lse, cu_seqlens);
  naming_errors_as(kSparseOp, [&] { check_max_seqlen_arg(max_seqlen); });
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(kv_latent.sym_sizes(), kv_latent.options()),
          at::empty_symint(k_rope.sym_sizes(), k_rope.options()), at::empty_symint(wkv_b.sym_sizes(), wkv_b.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, Meta, m) {
  m.impl("mla_sparse_attention", TORCH_FN(mla_sparse_attention_meta));
  m.impl("mla_sparse_attention_backward", TORCH_FN(mla_sparse_attention_backward_meta));
}

}  // namespace torch_mla
