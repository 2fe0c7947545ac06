// The CompositeExplicitAutograd kernels of the latent-only block (docs/design.md §13): the norms,
// the q expansion and o_proj in ATen around mla_attention (layer/block.h), so CPU, CUDA and
// Meta/fake tensors run the same code.
#include <torch/library.h>

#include <tuple>

#include "torch_mla/layer/block.h"
#include "torch_mla/ops/adapters.h"
#include "torch_mla/ops/mla_attention_block.h"

namespace torch_mla {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_block_with_rstd_composite(
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
  const BlockArgs args{q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin,
                       num_heads, softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave,
                       cu_seqlens, std::move(max_seqlen), std::string(core), head_chunks, topk_indices};
  check_block_inputs(args);
  BlockForward f = block_forward(args);
  return {f.y, f.q_rstd, f.kv_rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CompositeExplicitAutograd, m) {
  // The op's own kernel: y of the same computation (the rstd dropped).
  m.impl("mla_attention_block",
         TORCH_FN((FirstOutputOf<decltype(mla_attention_block), mla_attention_block_with_rstd_composite>::call)));
  m.impl("_mla_attention_block_with_rstd", TORCH_FN(mla_attention_block_with_rstd_composite));
}

}  // namespace torch_mla
