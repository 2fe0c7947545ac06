#pragma once
// The composed-ATen path of mla_attention on CUDA, for shapes and dtypes without a tuned kernel
// (float32, float64, other head sizes): the reference math of DESIGN.md §4, chunked over heads and
// query rows so that no full (S × S) score matrix of all heads is ever materialised. Same inputs,
// outputs and saved tensors as the kernels; slower.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "torch_mla/mla_shapes.h"

namespace torch_mla::cuda {

std::tuple<at::Tensor, at::Tensor> mla_attention_fallback(
    const MlaDims& d,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_attention_backward_fallback(
    const MlaDims& d,
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens);

}  // namespace torch_mla::cuda
