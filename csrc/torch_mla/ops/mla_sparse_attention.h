#pragma once
// mla_sparse_attention (DeepSeek Sparse Attention's attention, docs/design.md §16) as C++ functions
// through the dispatcher: Autograd (autograd/), Autocast (autocast/), Meta (meta/), CPU and CUDA
// (device/). Shapes as mla_attention (mla_attention.h) plus topk_indices int32 (B, S, k) | (T, k):
// positions within the query's own sequence, −1 none, entries past the query ignored. Causal only.
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace torch_mla {

// Returns (out, lse, max_logits) as mla_attention does; max_logits over the selected pairs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& topk_indices,
    double softmax_scale,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core = "auto",
    bool return_max_logits = false);

// Returns (grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b), each shaped like its input.
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
    c10::string_view core = "auto");

}  // namespace torch_mla
