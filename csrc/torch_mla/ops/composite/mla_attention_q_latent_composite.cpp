// The CompositeExplicitAutograd kernel of mla_attention_q_latent (docs/design.md §5.2): q expanded
// and rotated in ATen (layer/q_expand.h) around mla_attention, so CPU, CUDA and Meta/fake tensors
// run the same code.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/q_expand.h"
#include "torch_mla/ops/mla_attention.h"

namespace torch_mla {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_q_latent_composite(
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
  check_q_latent_inputs(q_latent, wq_b, cos, sin, k_rope, num_heads, cu_seqlens);
  const at::Tensor q = rotate_q(project_q(q_latent, wq_b, num_heads), cos, sin, rope_interleave);
  return naming_errors_as("torch_mla.mla_attention_q_latent: ", [&] {
    return mla_attention(q, kv_latent, k_rope, wkv_b, softmax_scale, causal, cu_seqlens, std::move(max_seqlen), core,
                         return_max_logits);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CompositeExplicitAutograd, m) {
  m.impl("mla_attention_q_latent", TORCH_FN(mla_attention_q_latent_composite));
}

}  // namespace torch_mla
