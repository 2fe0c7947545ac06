#pragma once
// The C++ functional API: torch_mla::mla_attention with autograd, as Python's
// torch_mla.mla_attention. Shapes: docs/design.md §3.
#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace torch_mla {

// Options of mla_attention. A default-constructed MlaOptions means causal attention with the
// default softmax scale (Dn+Dr)^-0.5 over a padded batch. Setters chain:
//   torch_mla::MlaOptions().causal(false).softmax_scale(0.1)
struct MlaOptions {
  // None: (Dn+Dr)^-0.5, from q's last dimension.
  TORCH_ARG(std::optional<double>, softmax_scale) = std::nullopt;
  // Mask keys after the query, within each sequence.
  TORCH_ARG(bool, causal) = true;
  // (B+1,) int32 sequence starts in the packed layout (0 first, T last); None: padded batch.
  TORCH_ARG(std::optional<at::Tensor>, cu_seqlens) = std::nullopt;
  // Longest packed sequence if known: a bound every sequence must respect (checked); 0: not given.
  TORCH_ARG(int64_t, max_seqlen) = 0;
  // The attention core: "auto" (the TORCH_MLA_CORE environment variable, else the selection rule
  // of docs/design.md §10.3) or a core's name: "cudnn", "cuda", "efficient", "cpu", "composed".
  TORCH_ARG(std::string, core) = "auto";
};

// Multi-Head Latent Attention from the latents; differentiable in q, kv_latent, k_rope and wkv_b.
// Only the latents (and q, out, lse) are saved for backward: K and V are expanded inside and
// recomputed by the backward.
//
//   q:         (B, S, H, Dn+Dr) | packed (T, H, Dn+Dr), per head [q_nope | q_rope]
//   kv_latent: (B, S, Dc)       | (T, Dc)
//   k_rope:    (B, S, Dr)       | (T, Dr), shared by all heads
//   wkv_b:     (H*(Dn+Dv), Dc), Hugging Face's kv_b_proj.weight (rows interleaved per head)
//   returns out (B, S, H, Dv) | (T, H, Dv) in q's dtype
at::Tensor mla_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const MlaOptions& options = {});

// mla_attention and the per-head maximum attention logit of the same forward, for QK-Clip
// (docs/design.md §12): returns (out, max_logits), max_logits (H,) float32 (float64 for float64
// inputs), the maximum of softmax_scale·q·k over each head's visible pairs, not differentiable.
std::tuple<at::Tensor, at::Tensor> mla_attention_with_max_logits(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const MlaOptions& options = {});

// Which attention core mla_attention would run for these arguments, and why: the chosen core's
// name on the first line, then "name: yes" or "name: no: why" for every core.
std::string explain(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const MlaOptions& options = {});

// (Dn+Dr)^-0.5 for a q of shape (..., H, Dn+Dr).
double default_softmax_scale(const at::Tensor& q);

// DeepSeek Sparse Attention's attention (docs/design.md §16): mla_attention, causal, with each query
// attending only to its selected keys. topk_indices int32 (B, S, k) | packed (T, k): positions in
// the query's own sequence, -1 none, entries past the query ignored. options.causal() must be true
// (sparse attention is causal only); returns out as mla_attention does. Saved for backward: q, the
// latents, wkv_b, topk_indices, out and lse.
at::Tensor mla_sparse_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& topk_indices,
    const MlaOptions& options = {});

// Options of dsa_indexer_loss. Default-constructed: dense mode, the default softmax scale, a
// padded batch.
struct IndexerLossOptions {
  // The scale the attention used; None: (Dn+Dr)^-0.5, from q's last dimension.
  TORCH_ARG(std::optional<double>, softmax_scale) = std::nullopt;
  // int32 (B, S, k) | (T, k) as mla_sparse_attention takes it: sparse mode; None: dense mode.
  TORCH_ARG(std::optional<at::Tensor>, topk_indices) = std::nullopt;
  // As MlaOptions.
  TORCH_ARG(std::optional<at::Tensor>, cu_seqlens) = std::nullopt;
  TORCH_ARG(int64_t, max_seqlen) = 0;
};

// The DSA indexer loss (docs/design.md §18): per query the KL between the main attention's
// probabilities summed over heads and L1-normalised (the teacher, treated as detached) and the
// softmax of the indexer's scores, over every visible key (dense) or the selected ones (sparse);
// differentiable in index_q, index_k and weights only.
//   index_q (B, S, H_I, D_I) | (T, H_I, D_I), index_k (B, S, D_I) | (T, D_I), weights (B, S, H_I) | (T, H_I);
//   q, kv_latent, k_rope, wkv_b as mla_attention; lse (B, S, H) | (T, H) float32 (float64 for
//   float64 q), the lse of mla_attention (dense) or mla_sparse_attention (sparse) on them
//   returns kl (B, S) | (T,) in lse's dtype
at::Tensor dsa_indexer_loss(
    const at::Tensor& index_q,
    const at::Tensor& index_k,
    const at::Tensor& weights,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& lse,
    const IndexerLossOptions& options = {});

}  // namespace torch_mla
