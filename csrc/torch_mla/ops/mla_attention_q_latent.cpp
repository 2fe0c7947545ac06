// The q-latent op: its schema and typed entry point (kernels: autograd/, autocast/, composite/).
#include "torch_mla/ops/mla_attention_q_latent.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torch_mla {

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  m.def(
      "mla_attention_q_latent(Tensor q_latent, Tensor wq_b, Tensor cos, Tensor sin, "
      "Tensor kv_latent, Tensor k_rope, Tensor wkv_b, int num_heads, float softmax_scale, "
      "bool causal, bool rope_interleave, Tensor? cu_seqlens, SymInt max_seqlen, str core=\"auto\", "
      "bool return_max_logits=False) -> (Tensor out, Tensor lse, Tensor max_logits)",
      {at::Tag::pt2_compliant_tag});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_q_latent(
    const at::Tensor& q_latent,
    const at::Tensor& wq_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    int64_t num_heads,
    double softmax_scale,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core,
    bool return_max_logits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::mla_attention_q_latent", "")
                       .typed<decltype(mla_attention_q_latent)>();
  return op.call(q_latent, wq_b, cos, sin, kv_latent, k_rope, wkv_b, num_heads, softmax_scale, causal,
                 rope_interleave, cu_seqlens, std::move(max_seqlen), core, return_max_logits);
}

}  // namespace torch_mla
