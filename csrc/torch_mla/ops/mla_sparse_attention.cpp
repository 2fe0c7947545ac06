// mla_sparse_attention and its backward: the schemas and the typed entry points through the
// dispatcher (docs/design.md §16). Kernels: autograd/, autocast/, meta/, device/ (CPU and CUDA).
#include "torch_mla/ops/mla_sparse_attention.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>


namespace torch_mla {

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  m.def(
      "mla_sparse_attention(Tensor q, Tensor kv_latent, Tensor k_rope, Tensor wkv_b, Tensor topk_indices, "
      "float softmax_scale, Tensor? cu_seqlens, SymInt max_seqlen, str core=\"auto\", "
      "bool return_max_logits=False) -> (Tensor out, Tensor lse, Tensor max_logits)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "mla_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor kv_latent, Tensor k_rope, Tensor wkv_b, "
      "Tensor topk_indices, Tensor out, Tensor lse, float softmax_scale, Tensor? cu_seqlens, SymInt max_seqlen, "
      "str core=\"auto\") -> (Tensor grad_q, Tensor grad_kv_latent, Tensor grad_k_rope, Tensor grad_wkv_b)",
      {at::Tag::pt2_compliant_tag});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& topk_indices,
    double softmax_scale,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core,
    bool return_max_logits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::mla_sparse_attention", "")
                       .typed<decltype(mla_sparse_attention)>();
  return op.call(q, kv_latent, k_rope, wkv_b, topk_indices, softmax_scale, cu_seqlens, std::move(max_seqlen), core,
                 return_max_logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_backward(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& topk_indices,
    const at::Tensor& out,
    const at::Tensor& lse,
    double softmax_scale,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::mla_sparse_attention_backward", "")
                       .typed<decltype(mla_sparse_attention_backward)>();
  return op.call(grad_out, q, kv_latent, k_rope, wkv_b, topk_indices, out, lse, softmax_scale, cu_seqlens,
                 std::move(max_seqlen), core);
}

}  // namespace torch_mla
