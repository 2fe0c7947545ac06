// The latent-only block op: its schemas and typed entry points (kernels: autograd/, autocast/,
// composite/; math: layer/block.h).
#include "torch_mla/ops/mla_attention_block.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace torch_mla {

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  static const std::string schema =
      "mla_attention_block(Tensor q_a, Tensor? q_norm_weight, Tensor wq_b, Tensor kv_a, "
      "Tensor kv_norm_weight, Tensor wkv_b, Tensor wo, Tensor? bo, Tensor cos, Tensor sin, int num_heads, "
      "float softmax_scale, float q_norm_eps, float kv_norm_eps, bool causal, bool rope_interleave, "
      "Tensor? cu_seqlens, SymInt max_seqlen, str core=\"auto\", int head_chunks=" +
      std::to_string(kDefaultHeadChunks) + ", Tensor? topk_indices=None) -> Tensor";
  m.def(schema.c_str(), {at::Tag::pt2_compliant_tag});
  m.def(
      "_mla_attention_block_with_rstd(Tensor q_a, Tensor? q_norm_weight, Tensor wq_b, Tensor kv_a, "
      "Tensor kv_norm_weight, Tensor wkv_b, Tensor wo, Tensor? bo, Tensor cos, Tensor sin, int num_heads, "
      "float softmax_scale, float q_norm_eps, float kv_norm_eps, bool causal, bool rope_interleave, "
      "Tensor? cu_seqlens, SymInt max_seqlen, str core, int head_chunks, Tensor? topk_indices) "
      "-> (Tensor y, Tensor q_rstd, Tensor kv_rstd)",
      {at::Tag::pt2_compliant_tag});
}


at::Tensor mla_attention_block(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core,
    int64_t head_chunks,
    const std::optional<at::Tensor>& topk_indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::mla_attention_block", "")
                       .typed<decltype(mla_attention_block)>();
  return op.call(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                 softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens,
                 std::move(max_seqlen), core, head_chunks, topk_indices);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_block_with_rstd(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core,
    int64_t head_chunks,
    const std::optional<at::Tensor>& topk_indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::_mla_attention_block_with_rstd", "")
                       .typed<decltype(mla_attention_block_with_rstd)>();
  return op.call(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                 softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens,
                 std::move(max_seqlen), core, head_chunks, topk_indices);
}

}  // namespace torch_mla
