#pragma once
// torch_mla::MultiHeadLatentAttention, the C++ twin of Python's torch_mla.MultiHeadLatentAttention
// and a drop-in for Hugging Face's DeepseekV2/V3 attention: same submodule and parameter names
// (state dicts map one to one), same RoPE and softmax scale (docs/design.md §2), and attention through
// torch_mla::mla_attention, so only the latents are saved for backward.
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

#include "torch_mla/ops/mla_attention_block.h"

namespace torch_mla {

// RMSNorm as Hugging Face's DeepseekV3RMSNorm: normalises in (at least) float32, casts back to the
// input dtype, then scales by `weight` (ones at init). The op torch_mla::rms_norm: saves only x and
// the per-row rstd for backward (docs/design.md §13.2).
class RMSNormImpl : public torch::nn::Cloneable<RMSNormImpl> {
 public:
  explicit RMSNormImpl(int64_t dim, double eps = 1e-6);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // x (..., dim) -> (..., dim)
  at::Tensor forward(const at::Tensor& x);

  int64_t dim;
  double eps;
  at::Tensor weight;
};
TORCH_MODULE(RMSNorm);

// YaRN rope scaling, Hugging Face's rope_scaling = {"type": "yarn", ...}. mscale and
// mscale_all_dim of 0 mean "not in the config".
struct YarnScaling {
  TORCH_ARG(double, factor) = 1.0;
  TORCH_ARG(double, mscale) = 0.0;
  TORCH_ARG(double, mscale_all_dim) = 0.0;
  TORCH_ARG(int64_t, original_max_position_embeddings) = 4096;
  TORCH_ARG(double, beta_fast) = 32.0;
  TORCH_ARG(double, beta_slow) = 1.0;
  TORCH_ARG(bool, truncate) = true;
};

// YaRN's magnitude correction: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1.
double yarn_get_mscale(double scale, double mscale = 1.0);

// The config of one attention layer, named as Hugging Face's DeepseekV3Config (defaults: DSv3).
struct MultiHeadLatentAttentionOptions {
  MultiHeadLatentAttentionOptions(int64_t hidden_size, int64_t num_heads)
      : hidden_size_(hidden_size), num_heads_(num_heads) {}
  TORCH_ARG(int64_t, hidden_size);
  TORCH_ARG(int64_t, num_heads);
  // None: a single q_proj (DeepSeek-V2-Lite); else q_a_proj -> q_a_layernorm -> q_b_proj.
  TORCH_ARG(std::optional<int64_t>, q_lora_rank) = 1536;
  TORCH_ARG(int64_t, kv_lora_rank) = 512;      // Dc
  TORCH_ARG(int64_t, qk_nope_head_dim) = 128;  // Dn
  TORCH_ARG(int64_t, qk_rope_head_dim) = 64;   // Dr (0: no RoPE part, GLM-5.3's NoPE MLA)
  TORCH_ARG(int64_t, v_head_dim) = 128;        // Dv
  TORCH_ARG(double, rope_theta) = 10000.0;
  TORCH_ARG(std::optional<YarnScaling>, rope_scaling) = std::nullopt;
  // true: rotate adjacent pairs (DeepSeek-V3's rope_interleave=True); false: rotate halves.
  TORCH_ARG(bool, rope_interleave) = true;
  // The family glue (docs/design.md §15), as Python's MlaGlue. false: q_rope and k_rope enter
  // unrotated and the softmax scale is plain (Kimi Linear's MLA layers).
  TORCH_ARG(bool, rotary) = true;
  // Factors on q (all of it) and on the normed kv_latent before attention; k_rope is not scaled
  // (LongCat-Flash: (hidden_size / q_lora_rank)^0.5 and (hidden_size / kv_lora_rank)^0.5).
  TORCH_ARG(double, q_scale) = 1.0;
  TORCH_ARG(double, kv_scale) = 1.0;
  TORCH_ARG(double, rms_norm_eps) = 1e-6;
  // Bias on q_a_proj, kv_a_proj_with_mqa and o_proj (never on q_proj, q_b_proj, kv_b_proj).
  TORCH_ARG(bool, attention_bias) = false;
  // Keep each forward's per-head maximum attention logit in `max_logits`, for QK-Clip
  // (docs/design.md §12); off: nothing is computed.
  TORCH_ARG(bool, record_max_logits) = false;
  // What is kept for backward (docs/design.md §13.3): "q" (mla_attention: q, the latents, out,
  // lse), "q_latent" (mla_attention_q_latent: q's latent instead of q) or "latent"
  // (mla_attention_block: after q_a_proj and kv_a_proj_with_mqa only their outputs and the norms'
  // statistics; q, out and o_proj's input are recomputed in backward).
  TORCH_ARG(std::string, save) = "q";
  // With save "latent": the heads run in this many groups, so that one group's q, out and
  // attention transients exist at a time (docs/design.md §13.6).
  TORCH_ARG(int64_t, head_chunks) = kDefaultHeadChunks;
};

class MultiHeadLatentAttentionImpl : public torch::nn::Cloneable<MultiHeadLatentAttentionImpl> {
 public:
  explicit MultiHeadLatentAttentionImpl(const MultiHeadLatentAttentionOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // Causal self-attention.
  //   hidden_states: (B, S, hidden_size), or packed (T, hidden_size) with cu_seqlens
  //   position_ids:  (B, S) or (S,) padded, (T,) packed, int64; default: 0, 1, ... per sequence
  //   cu_seqlens:    (B+1,) int32 sequence starts of the packed layout
  //   max_seqlen:    longest packed sequence if known (<= 0: not given)
  //   returns (B, S, hidden_size) | (T, hidden_size)
  at::Tensor forward(
      const at::Tensor& hidden_states,
      const std::optional<at::Tensor>& position_ids = std::nullopt,
      const std::optional<at::Tensor>& cu_seqlens = std::nullopt,
      int64_t max_seqlen = 0);

  // (Dn+Dr)^-0.5, times yarn_get_mscale(factor, mscale_all_dim)^2 with YaRN (and rotary); the op
  // takes it times q_scale.
  double softmax_scale() const;
  // RoPE inverse frequencies (Dr/2,) as Hugging Face computes them (YaRN-blended when set), in
  // `dtype` (float32 as HF for every input dtype but float64).
  at::Tensor rope_inv_freq(at::ScalarType dtype = at::kFloat, at::Device device = at::kCPU) const;
  // The factor on cos and sin: 1, or YaRN's attention factor.
  double rope_attention_factor() const;

  MultiHeadLatentAttentionOptions options;
  torch::nn::Linear q_a_proj{nullptr};  // set when q_lora_rank is set
  RMSNorm q_a_layernorm{nullptr};       // set when q_lora_rank is set
  torch::nn::Linear q_b_proj{nullptr};  // set when q_lora_rank is set
  torch::nn::Linear q_proj{nullptr};    // set when q_lora_rank is None
  torch::nn::Linear kv_a_proj_with_mqa{nullptr};
  RMSNorm kv_a_layernorm{nullptr};
  torch::nn::Linear kv_b_proj{nullptr};  // its weight is the op's wkv_b
  torch::nn::Linear o_proj{nullptr};
  // With options.record_max_logits: the last forward's (H,) maximum of softmax_scale·q·k per head
  // (float32; float64 for float64 modules), not differentiable; undefined before the first one.
  at::Tensor max_logits;
};
TORCH_MODULE(MultiHeadLatentAttention);

}  // namespace torch_mla
