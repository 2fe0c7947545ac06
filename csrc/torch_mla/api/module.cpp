#include "torch_mla/api/module.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <tuple>

#include "torch_mla/api/functional.h"
#include "torch_mla/ops/mla_attention_block.h"
#include "torch_mla/ops/mla_attention_q_latent.h"
#include "torch_mla/layer/q_expand.h"
#include "torch_mla/layer/rms_norm.h"
#include "torch_mla/ops/rms_norm.h"

namespace torch_mla {
namespace {

at::ScalarType rope_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// HF's rotate_half: [x1 | x2] -> [-x2 | x1].
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// x (..., Dr); cos and sin broadcast to it. The interleaved form first regroups the adjacent
// pairs (x0, x1), (x2, x3), ... as [x0 x2 ... | x1 x3 ...] (HF's apply_rotary_pos_emb_interleave):
// q and k are permuted alike, so their dot products are those of the pairwise rotation.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool interleave) {
  at::Tensor y = x;
  if (interleave) {
    const int64_t d = x.size(-1);
    std::vector<int64_t> pairs(x.sizes().begin(), x.sizes().end() - 1);
    pairs.insert(pairs.end(), {d / 2, 2});
    y = x.reshape(pairs).transpose(-1, -2).flatten(-2);
  }
  return y * cos + rotate_half(y) * sin;
}

// Positions 0, 1, ... restarting at every sequence start of a packed batch, (T,) int64.
at::Tensor packed_positions(const at::Tensor& cu_seqlens, int64_t tokens) {
  const at::Tensor cu = cu_seqlens.to(at::kLong);
  const at::Tensor starts = cu.narrow(0, 0, cu.size(0) - 1);
  const at::Tensor lengths = cu.narrow(0, 1, cu.size(0) - 1) - starts;
  return at::arange(tokens, cu.options()) -
         at::repeat_interleave(starts, lengths, /*dim=*/0, /*output_size=*/tokens);
}

}  // namespace

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : dim(dim), eps(eps) {
  reset();
}

void RMSNormImpl::reset() {
  weight = register_parameter("weight", torch::ones({dim}));
}

void RMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "torch_mla::RMSNorm(" << dim << ", eps=" << eps << ")";
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  return rms_norm(x, weight, eps);
}

double yarn_get_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

MultiHeadLatentAttentionImpl::MultiHeadLatentAttentionImpl(
    const MultiHeadLatentAttentionOptions& options)
    : options(options) {
  reset();
}

void MultiHeadLatentAttentionImpl::reset() {
  const auto& o = options;
  TORCH_CHECK_VALUE(o.hidden_size() > 0 && o.num_heads() > 0 && o.kv_lora_rank() > 0 &&
                        o.qk_nope_head_dim() > 0 && o.v_head_dim() > 0,
                    "torch_mla::MultiHeadLatentAttention: hidden_size, num_heads, kv_lora_rank, "
                    "qk_nope_head_dim and v_head_dim must be positive");
  TORCH_CHECK_VALUE(o.qk_rope_head_dim() >= 0 && o.qk_rope_head_dim() % 2 == 0,
                    "torch_mla::MultiHeadLatentAttention: qk_rope_head_dim must be even and >= 0, got ",
                    o.qk_rope_head_dim());
  TORCH_CHECK_VALUE(!o.q_lora_rank() || *o.q_lora_rank() > 0,
                    "torch_mla::MultiHeadLatentAttention: q_lora_rank must be positive or None");
  TORCH_CHECK_VALUE(o.save() == "q" || o.save() == "q_latent" || o.save() == "latent",
                    "torch_mla::MultiHeadLatentAttention: save must be \"q\", \"q_latent\" or \"latent\", got \"",
                    o.save(), "\"");
  TORCH_CHECK_VALUE(o.head_chunks() >= 1, "torch_mla::MultiHeadLatentAttention: head_chunks must be >= 1, got ",
                    o.head_chunks());
  const int64_t qk_head_dim = o.qk_nope_head_dim() + o.qk_rope_head_dim();
  auto linear = [](int64_t in, int64_t out, bool bias) {
    return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
  };
  if (o.q_lora_rank()) {
    const int64_t rank = *o.q_lora_rank();
    q_a_proj = register_module("q_a_proj", linear(o.hidden_size(), rank, o.attention_bias()));
    q_a_layernorm = register_module("q_a_layernorm", RMSNorm(rank, o.rms_norm_eps()));
    q_b_proj = register_module("q_b_proj", linear(rank, o.num_heads() * qk_head_dim, false));
  } else {
    q_proj = register_module("q_proj", linear(o.hidden_size(), o.num_heads() * qk_head_dim, false));
  }
  kv_a_proj_with_mqa = register_module(
      "kv_a_proj_with_mqa",
      linear(o.hidden_size(), o.kv_lora_rank() + o.qk_rope_head_dim(), o.attention_bias()));
  kv_a_layernorm = register_module("kv_a_layernorm", RMSNorm(o.kv_lora_rank(), o.rms_norm_eps()));
  kv_b_proj = register_module(
      "kv_b_proj",
      linear(o.kv_lora_rank(), o.num_heads() * (o.qk_nope_head_dim() + o.v_head_dim()), false));
  o_proj = register_module("o_proj", linear(o.num_heads() * o.v_head_dim(), o.hidden_size(),
                                            o.attention_bias()));
}

void MultiHeadLatentAttentionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << "torch_mla::MultiHeadLatentAttention(hidden_size=" << o.hidden_size()
         << ", num_heads=" << o.num_heads() << ", q_lora_rank="
         << (o.q_lora_rank() ? std::to_string(*o.q_lora_rank()) : "None")
         << ", kv_lora_rank=" << o.kv_lora_rank() << ", qk_nope_head_dim=" << o.qk_nope_head_dim()
         << ", qk_rope_head_dim=" << o.qk_rope_head_dim() << ", v_head_dim=" << o.v_head_dim()
         << ", rope_interleave=" << (o.rope_interleave() ? "true" : "false")
         << ", rotary=" << (o.rotary() ? "true" : "false") << ", q_scale=" << o.q_scale()
         << ", kv_scale=" << o.kv_scale() << ")";
}

double MultiHeadLatentAttentionImpl::softmax_scale() const {
  const auto& o = options;
  double scale = 1.0 / std::sqrt(static_cast<double>(o.qk_nope_head_dim() + o.qk_rope_head_dim()));
  if (o.rotary() && o.rope_scaling() && o.rope_scaling()->mscale_all_dim() != 0.0) {
    const double mscale = yarn_get_mscale(o.rope_scaling()->factor(), o.rope_scaling()->mscale_all_dim());
    scale *= mscale * mscale;
  }
  return scale;
}

double MultiHeadLatentAttentionImpl::rope_attention_factor() const {
  if (!options.rope_scaling()) return 1.0;
  const YarnScaling& y = *options.rope_scaling();
  if (y.mscale() != 0.0 && y.mscale_all_dim() != 0.0) {
    return yarn_get_mscale(y.factor(), y.mscale()) / yarn_get_mscale(y.factor(), y.mscale_all_dim());
  }
  return yarn_get_mscale(y.factor());
}

at::Tensor MultiHeadLatentAttentionImpl::rope_inv_freq(at::ScalarType dtype, at::Device device) const {
  const int64_t dim = options.qk_rope_head_dim();
  const double base = options.rope_theta();
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  const at::Tensor pos_freqs = at::pow(base, at::arange(0, dim, 2, opts.dtype(at::kLong)).to(dtype) / dim);
  if (!options.rope_scaling()) return 1.0 / pos_freqs;

  // YaRN: keep the high-frequency dims (many rotations over the original context), interpolate
  // the low-frequency ones by `factor`, blend linearly in between.
  const YarnScaling& y = *options.rope_scaling();
  const auto correction_dim = [&](double rotations) {
    return dim * std::log(y.original_max_position_embeddings() / (rotations * 2 * std::numbers::pi)) /
           (2 * std::log(base));
  };
  double low = correction_dim(y.beta_fast());
  double high = correction_dim(y.beta_slow());
  if (y.truncate()) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  const at::Tensor ramp = at::clamp((at::arange(dim / 2, opts) - low) / (high - low), 0, 1);
  const at::Tensor extrapolation_factor = 1 - ramp;
  const at::Tensor extrapolated = 1.0 / pos_freqs;
  const at::Tensor interpolated = 1.0 / (y.factor() * pos_freqs);
  return interpolated * (1 - extrapolation_factor) + extrapolated * extrapolation_factor;
}

at::Tensor MultiHeadLatentAttentionImpl::forward(
    const at::Tensor& hidden_states,
    const std::optional<at::Tensor>& position_ids,
    const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen) {
  const auto& o = options;
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  TORCH_CHECK_VALUE(
      hidden_states.dim() == (packed ? 2 : 3) && hidden_states.size(-1) == o.hidden_size(),
      "torch_mla::MultiHeadLatentAttention: hidden_states must have shape ",
      packed ? "(T, hidden_size) with cu_seqlens" : "(B, S, hidden_size)", " with hidden_size = ",
      o.hidden_size(), ", got shape ", hidden_states.sizes());
  const int64_t dim_nope = o.qk_nope_head_dim();
  const int64_t dim_rope = o.qk_rope_head_dim();
  const auto lead = hidden_states.sizes().slice(0, hidden_states.dim() - 1);

  const at::Tensor compressed_kv = kv_a_proj_with_mqa(hidden_states);
  at::Tensor positions;
  if (position_ids.has_value() && position_ids->defined()) {
    positions = *position_ids;
  } else if (packed) {
    positions = packed_positions(*cu_seqlens, hidden_states.size(0));
  } else {
    positions = at::arange(hidden_states.size(1), hidden_states.options().dtype(at::kLong));
  }
  // cos/sin as HF: angles in float32 (float64 for float64 inputs), then cast to the input dtype.
  const at::ScalarType dtype = rope_dtype(hidden_states.scalar_type());
  // Without rotary, angle 0 and factor 1: every rotation below is the identity, exactly.
  const at::Tensor angles = positions.to(dtype).unsqueeze(-1) * rope_inv_freq(dtype, hidden_states.device()) *
                            (o.rotary() ? 1 : 0);
  const at::Tensor emb = at::cat({angles, angles}, -1);
  const double factor = o.rotary() ? rope_attention_factor() : 1.0;
  // q_scale multiplies every logit q·k, so it folds exactly into the softmax scale.
  const double op_scale = softmax_scale() * o.q_scale();
  const at::Tensor cos = (emb.cos() * factor).to(hidden_states.scalar_type());
  const at::Tensor sin = (emb.sin() * factor).to(hidden_states.scalar_type());

  const at::Tensor& wq_b = o.q_lora_rank() ? q_b_proj->weight : q_proj->weight;
  const std::optional<at::Tensor> cu = packed ? cu_seqlens : std::nullopt;
  at::Tensor half_cos, half_sin;  // the ops rotate by cos/sin of (..., Dr/2), in the angles' dtype
  if (o.save() != "q") {
    std::vector<int64_t> half_shape(lead.begin(), lead.end());
    half_shape.push_back(dim_rope / 2);
    half_cos = (angles.cos() * factor).expand(half_shape);
    half_sin = (angles.sin() * factor).expand(half_shape);
  }
  if (o.save() == "latent") {
    TORCH_CHECK_VALUE(!o.record_max_logits(), "torch_mla::MultiHeadLatentAttention: record_max_logits needs "
                      "save='q' or save='q_latent': the latent-only block (save='latent') does not return max logits");
    return mla_attention_block(
        o.q_lora_rank() ? q_a_proj(hidden_states) : hidden_states,
        o.q_lora_rank() ? std::optional<at::Tensor>(q_a_layernorm->weight) : std::nullopt, wq_b, compressed_kv,
        // The block normalises inside: kv_scale goes on the norm weight it takes.
        o.kv_scale() != 1.0 ? kv_a_layernorm->weight * o.kv_scale() : kv_a_layernorm->weight, kv_b_proj->weight,
        o_proj->weight, o_proj->bias.defined() ? std::optional<at::Tensor>(o_proj->bias) : std::nullopt, half_cos,
        half_sin, o.num_heads(), op_scale, o.q_lora_rank() ? q_a_layernorm->eps : 1e-6, kv_a_layernorm->eps,
        /*causal=*/true, o.rope_interleave(), cu, max_seqlen, "auto", o.head_chunks());
  }
  at::Tensor kv_latent = kv_a_layernorm(compressed_kv.narrow(-1, 0, o.kv_lora_rank()));
  if (o.kv_scale() != 1.0) kv_latent = kv_latent * o.kv_scale();
  const at::Tensor k_rope_raw = compressed_kv.narrow(-1, o.kv_lora_rank(), dim_rope);
  const at::Tensor c_q = o.q_lora_rank() ? q_a_layernorm(q_a_proj(hidden_states)) : hidden_states;
  at::Tensor out;
  if (o.save() == "q_latent") {
    // The op rotates q's pairs in place, so k_rope is rotated the same way (as one head of q).
    const at::Tensor k_rope = rotate_q(k_rope_raw.unsqueeze(-2), half_cos, half_sin, o.rope_interleave()).squeeze(-2);
    at::Tensor lse, maxes;
    std::tie(out, lse, maxes) =
        mla_attention_q_latent(c_q, wq_b, half_cos, half_sin, kv_latent, k_rope, kv_b_proj->weight, o.num_heads(),
                               op_scale, /*causal=*/true, o.rope_interleave(), cu, max_seqlen, "auto",
                               o.record_max_logits());
    if (o.record_max_logits()) max_logits = maxes;
  } else {
    const at::Tensor k_rope = apply_rope(k_rope_raw, cos, sin, o.rope_interleave());
    std::vector<int64_t> q_shape(lead.begin(), lead.end());
    q_shape.insert(q_shape.end(), {o.num_heads(), dim_nope + dim_rope});
    at::Tensor q = (o.q_lora_rank() ? q_b_proj(c_q) : q_proj(hidden_states)).view(q_shape);
    const at::Tensor q_rope = apply_rope(q.narrow(-1, dim_nope, dim_rope), cos.unsqueeze(-2),
                                         sin.unsqueeze(-2), o.rope_interleave());
    q = at::cat({q.narrow(-1, 0, dim_nope), q_rope}, -1);
    const MlaOptions attention =
        MlaOptions().softmax_scale(op_scale).causal(true).cu_seqlens(cu).max_seqlen(max_seqlen);
    if (o.record_max_logits()) {
      std::tie(out, max_logits) = mla_attention_with_max_logits(q, kv_latent, k_rope, kv_b_proj->weight, attention);
    } else {
      out = mla_attention(q, kv_latent, k_rope, kv_b_proj->weight, attention);
    }
  }
  // A view of out: o_proj saves the op's own output, no second copy.
  return o_proj(out.flatten(-2));
}

}  // namespace torch_mla
