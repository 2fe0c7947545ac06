#pragma once
// The torch_mla operators as C++ functions. Each call goes through the dispatcher, so it reaches
// the Autograd kernel (autograd/), then the CPU or CUDA kernel (cpu/, cuda/) or the Meta kernel
// (meta/). Contract: docs/design.md §3; padded q (B, S, H, Dn+Dr), packed q (T, H, Dn+Dr).
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <string>
#include <tuple>

namespace torch_mla {

// Returns (out, lse, max_logits): out (B, S, H, Dv) / (T, H, Dv) in q's dtype, lse (B, S, H) /
// (T, H) in float32 (float64 for float64 inputs). max_seqlen: 0 means "not given", a positive value
// bounds every sequence (checked), a negative one is an error (docs/design.md §3.2). core: "auto"
// or an attention core's name (docs/design.md §10.3). max_logits, in lse's dtype and never
// differentiable: with return_max_logits (H,), per head the maximum of softmax_scale·q·k over the
// visible (query, key) pairs (−inf for a head with none), else an empty (0,) tensor (§12).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core = "auto",
    bool return_max_logits = false);

// Returns (grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b), each shaped like its input. `core`
// should name the core the forward ran (the autograd Function passes it on).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_attention_backward(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view core = "auto");

}  // namespace torch_mla
