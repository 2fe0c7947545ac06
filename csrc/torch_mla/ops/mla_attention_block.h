#pragma once
// The latent-only attention block op (docs/design.md §13; its math: layer/block.h): from the
// outputs of q_a_proj and kv_a_proj_with_mqa to the block's output, one op whose backward needs
// only its inputs:
//   c_q       = rms_norm(q_a, q_norm_weight)       (q_a itself when q_norm_weight is None)
//   q         = rope(c_q · wq_bᵀ per head)          as mla_attention_q_latent (docs/design.md §5.2)
//   kv_latent = rms_norm(kv_a[..., :Dc], kv_norm_weight),  k_rope = rope(kv_a[..., Dc:])
//   out       = mla_attention(q, kv_latent, k_rope, wkv_b)
//   y         = out.flatten(-2) · woᵀ + bo          (o_proj)
// It saves q_a, kv_a, cos, sin, the norms' per-row rstd and the weights: never c_q, q, kv_latent,
// k_rope, out or lse; the backward recomputes them with one attention forward through the core the
// forward ran. Padded / packed shapes (cu_seqlens given):
//   q_a        (B, S, Lq)        | (T, Lq)          q_a_proj's output (the hidden states without q latent)
//   q_norm_weight (Lq,) or None  q_a_layernorm.weight (any float dtype)
//   wq_b       (H·(Dn+Dr), Lq)   q_b_proj.weight (q_proj.weight without q latent)
//   kv_a       (B, S, Dc+Dr)     | (T, Dc+Dr)       kv_a_proj_with_mqa's output: [latent | k_rope], not rotated
//   kv_norm_weight (Dc,)         kv_a_layernorm.weight (any float dtype)
//   wkv_b      (H·(Dn+Dv), Dc)   kv_b_proj.weight
//   wo         (hidden, H·Dv)    o_proj.weight;  bo (hidden,) or None
//   cos, sin   (B, S, Dr/2)      | (T, Dr/2)
//   returns y  (B, S, hidden)    | (T, hidden), in wo's dtype
// The heads run in `head_chunks` groups, forward and backward (docs/design.md §13.6): only one
// group's q, out and attention transients exist at a time.
// With topk_indices (int32 (B, S, k) | (T, k), mla_sparse_attention's, docs/design.md §16.3) the
// attention is mla_sparse_attention on them, causal only: the DSA block (docs/design.md §13.7), which
// saves topk_indices on top of the dense block's set.
// The norms' outputs are cast to wq_b's / wkv_b's dtype (what autocast's linear does to a float32
// norm output); every other tensor shares q_a's dtype and device.
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace torch_mla {

// The heads' default number of groups (docs/design.md §13.6).
constexpr int64_t kDefaultHeadChunks = 4;

// The dispatcher op torch_mla::mla_attention_block (autograd included); returns y.
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
    c10::string_view core = "auto",
    int64_t head_chunks = kDefaultHeadChunks,
    const std::optional<at::Tensor>& topk_indices = std::nullopt);

// The dispatcher op torch_mla::_mla_attention_block_with_rstd: (y, q_rstd, kv_rstd), checks
// included, no autograd. What the autograd Function runs below the Autograd key (with the core it
// resolved), so that tracing and schema checks see one op.
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
    const std::optional<at::Tensor>& topk_indices);

}  // namespace torch_mla
