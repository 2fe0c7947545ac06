#pragma once
// mla_attention in q-latent mode (docs/design.md §5.2): the op takes the query latent c_q and q_b_proj's
// weight instead of q, expands and rotates q inside, and saves c_q for backward instead of q
// (H·(Dn+Dr) values per token become Lq, e.g. 24,576 → 1,536 at DeepSeek-V3's sizes); the
// backward recomputes q. Padded / packed shapes as mla_attention (docs/design.md §3):
//   q_latent   (B, S, Lq)     | (T, Lq)
//   wq_b       (H·(Dn+Dr), Lq), Hugging Face's q_b_proj.weight: per head [q_nope | q_rope] rows
//   cos, sin   (B, S, Dr/2)   | (T, Dr/2), the rotation of each q_rope pair (any float dtype)
//   kv_latent, k_rope (k_rope already rotated), wkv_b: as mla_attention.
// rope_interleave: pairs (2i, 2i+1) of q_rope are rotated in place; otherwise pairs (i, i+Dr/2).
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace torch_mla {

// Returns (out, lse, max_logits) exactly as mla_attention on q = rope([c_q · wq_bᵀ] per head).
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
    c10::string_view core = "auto",
    bool return_max_logits = false);

}  // namespace torch_mla
