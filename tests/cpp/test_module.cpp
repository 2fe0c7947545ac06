// torch_mla::MultiHeadLatentAttention: Hugging Face's parameter names and shapes, forward and
// backward against a naive float64 re-implementation of HF's attention (pairwise RoPE, expanded
// K/V), YaRN, packed input, RoPE's relative positions, and what the module keeps for backward.
#include <cmath>
#include <map>
#include <numbers>
#include <string>

#include "test_support.h"  // torch, torch_mla and Catch, in the order they need

using namespace torch_mla_test;
using torch::indexing::Slice;

namespace {

torch_mla::MultiHeadLatentAttentionOptions small_options(bool q_lora, bool interleave) {
  return torch_mla::MultiHeadLatentAttentionOptions(32, 3)
      .q_lora_rank(q_lora ? std::optional<int64_t>(24) : std::nullopt)
      .kv_lora_rank(16)
      .qk_nope_head_dim(8)
      .qk_rope_head_dim(6)
      .v_head_dim(10)
      .rope_interleave(interleave);
}

torch_mla::MultiHeadLatentAttention make_module(const torch_mla::MultiHeadLatentAttentionOptions& o,
                                                torch::Dtype dtype, uint64_t seed) {
  torch::manual_seed(seed);
  torch_mla::MultiHeadLatentAttention attn(o);
  attn->to(dtype);
  // Non-trivial norm weights and biases, so a misplaced one shows.
  torch::NoGradGuard no_grad;
  for (auto& p : attn->named_parameters()) {
    if (p.key().find("layernorm") != std::string::npos || p.key().find("bias") != std::string::npos) {
      p.value().uniform_(0.5, 1.5);
    }
  }
  return attn;
}

torch::Tensor ref_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return weight * x * torch::rsqrt(x.pow(2).mean(-1, true) + eps);
}

torch::Tensor ref_linear(const torch::Tensor& x, const torch::nn::Linear& l) {
  return torch::nn::functional::linear(x, l->weight, l->bias.defined() ? l->bias : torch::Tensor());
}

// RoPE as a rotation of pairs by angle position * inv_freq[i]: pairs (x[2i], x[2i+1]) when
// interleaved (DeepSeek's original complex-number form), (x[i], x[i + Dr/2]) otherwise.
// positions broadcasts against x's leading dims, with x (..., Dr).
torch::Tensor ref_rope(const torch::Tensor& x, const torch::Tensor& angles, bool interleave, double factor) {
  const int64_t half = x.size(-1) / 2;
  const auto a = interleave ? x.index({"...", Slice(0, torch::indexing::None, 2)}) : x.narrow(-1, 0, half);
  const auto b = interleave ? x.index({"...", Slice(1, torch::indexing::None, 2)}) : x.narrow(-1, half, half);
  const auto c = angles.cos() * factor, s = angles.sin() * factor;
  const auto ra = a * c - b * s, rb = a * s + b * c;
  return interleave ? torch::stack({ra, rb}, -1).flatten(-2) : torch::cat({ra, rb}, -1);
}

struct RefRope {
  torch::Tensor inv_freq;  // (Dr/2,)
  double factor = 1.0;
  double softmax_scale = 0.0;
};

RefRope plain_rope(const torch_mla::MultiHeadLatentAttentionOptions& o) {
  const int64_t dr = o.qk_rope_head_dim();
  return {torch::pow(o.rope_theta(), -torch::arange(0, dr, 2, torch::kDouble) / dr), 1.0,
          1.0 / std::sqrt(static_cast<double>(o.qk_nope_head_dim() + dr))};
}

// Hugging Face's DeepseekV3Attention, padded (B, S, hidden), written out in float64 with the
// naive attention of test_support.h. positions (S,).
torch::Tensor ref_attention(torch_mla::MultiHeadLatentAttentionImpl& m, const torch::Tensor& x,
                            const torch::Tensor& positions, const RefRope& rope) {
  const auto& o = m.options;
  const int64_t dn = o.qk_nope_head_dim(), dr = o.qk_rope_head_dim(), dc = o.kv_lora_rank();
  auto q = o.q_lora_rank()
               ? ref_linear(ref_rms_norm(ref_linear(x, m.q_a_proj), m.q_a_layernorm->weight, o.rms_norm_eps()), m.q_b_proj)
               : ref_linear(x, m.q_proj);
  q = q.unflatten(-1, {o.num_heads(), dn + dr}) * o.q_scale();
  const auto ckv = ref_linear(x, m.kv_a_proj_with_mqa);
  const auto latent = ref_rms_norm(ckv.narrow(-1, 0, dc), m.kv_a_layernorm->weight, o.rms_norm_eps()) * o.kv_scale();
  // Without rotary (Kimi Linear's MLA) every angle is 0: q_rope and k_rope unrotated.
  const auto angles = positions.to(torch::kDouble).unsqueeze(-1) * rope.inv_freq * (o.rotary() ? 1 : 0);
  const auto k_rope = ref_rope(ckv.narrow(-1, dc, dr), angles, o.rope_interleave(), rope.factor);
  const auto q_rope = ref_rope(q.narrow(-1, dn, dr), angles.unsqueeze(-2), o.rope_interleave(), rope.factor);
  q = torch::cat({q.narrow(-1, 0, dn), q_rope}, -1);
  const auto out = naive_mla(q, latent, k_rope, m.kv_b_proj->weight, rope.softmax_scale, true);
  return ref_linear(out.flatten(-2), m.o_proj);
}

std::map<std::string, std::vector<int64_t>> parameter_shapes(const torch::nn::Module& m) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& p : m.named_parameters()) shapes[p.key()] = p.value().sizes().vec();
  return shapes;
}

// Every parameter's gradient and the input's, for a fixed random grad_out.
std::vector<torch::Tensor> all_grads(const torch::Tensor& out, torch::nn::Module& m, const torch::Tensor& x) {
  std::vector<torch::Tensor> leaves = m.parameters();
  leaves.push_back(x);
  return grads_of(out, leaves);
}

// out against expected, and the grads of m's parameters and x through both, to 1e-12 relative.
void check_same_results(const torch::Tensor& out, const torch::Tensor& expected, torch::nn::Module& m,
                        const torch::Tensor& x) {
  CHECK(max_rel_err(out, expected) <= 1e-12);
  const auto grads = all_grads(out, m, x);
  const auto expected_grads = all_grads(expected, m, x);
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(i);
    CHECK(max_rel_err(grads[i], expected_grads[i]) <= 1e-12);
  }
}

}  // namespace

TEST_CASE("MultiHeadLatentAttention has Hugging Face's parameter names and shapes", "[module]") {
  using Shapes = std::map<std::string, std::vector<int64_t>>;
  SECTION("q_lora_rank set (DeepSeek-V3)") {
    torch_mla::MultiHeadLatentAttention attn(small_options(true, true));
    CHECK((parameter_shapes(*attn) == Shapes{
        {"q_a_proj.weight", {24, 32}},
        {"q_a_layernorm.weight", {24}},
        {"q_b_proj.weight", {3 * 14, 24}},
        {"kv_a_proj_with_mqa.weight", {16 + 6, 32}},
        {"kv_a_layernorm.weight", {16}},
        {"kv_b_proj.weight", {3 * (8 + 10), 16}},
        {"o_proj.weight", {32, 3 * 10}},
    }));
  }
  SECTION("q_lora_rank None (DeepSeek-V2-Lite), attention_bias") {
    torch_mla::MultiHeadLatentAttention attn(small_options(false, true).attention_bias(true));
    CHECK((parameter_shapes(*attn) == Shapes{
        {"q_proj.weight", {3 * 14, 32}},
        {"kv_a_proj_with_mqa.weight", {16 + 6, 32}},
        {"kv_a_proj_with_mqa.bias", {16 + 6}},
        {"kv_a_layernorm.weight", {16}},
        {"kv_b_proj.weight", {3 * (8 + 10), 16}},
        {"o_proj.weight", {32, 3 * 10}},
        {"o_proj.bias", {32}},
    }));
  }
  SECTION("DeepSeek-V3 defaults") {
    torch_mla::MultiHeadLatentAttention attn(torch_mla::MultiHeadLatentAttentionOptions(7168, 128));
    const auto shapes = parameter_shapes(*attn);
    CHECK((shapes.at("q_b_proj.weight") == std::vector<int64_t>{128 * 192, 1536}));
    CHECK((shapes.at("kv_a_proj_with_mqa.weight") == std::vector<int64_t>{576, 7168}));
    CHECK((shapes.at("kv_b_proj.weight") == std::vector<int64_t>{128 * 256, 512}));
    CHECK(attn->softmax_scale() == Approx(1.0 / std::sqrt(192.0)).epsilon(1e-15));
  }
}

TEST_CASE("MultiHeadLatentAttention forward and backward match Hugging Face's attention in float64",
          "[module]") {
  const bool q_lora = GENERATE(true, false);
  const bool interleave = GENERATE(true, false);
  const std::string save = GENERATE("q", "q_latent", "latent");  // docs/design.md §13.3
  CAPTURE(q_lora, interleave, save);
  const auto o = small_options(q_lora, interleave).save(save);
  auto attn = make_module(o, torch::kDouble, 0);
  torch::manual_seed(1);
  const auto x = torch::randn({2, 13, 32}, torch::kDouble).requires_grad_(true);

  const auto out = attn(x);
  const auto ref = ref_attention(*attn, x, torch::arange(13), plain_rope(o));
  REQUIRE(out.sizes() == x.sizes());
  CHECK(max_rel_err(out, ref) <= 1e-12);

  const auto grads = all_grads(out, *attn, x);
  const auto ref_grads = all_grads(ref, *attn, x);
  const auto names = attn->named_parameters().keys();
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(i < names.size() ? names[i] : std::string("hidden_states"));
    CHECK(grads[i].abs().max().item<double>() > 0);
    CHECK(max_rel_err(grads[i], ref_grads[i]) <= 1e-12);
  }
}

TEST_CASE("The family glue: no RoPE part, unrotated RoPE, latent scales, in float64", "[module][glue]") {
  // docs/design.md §15: Dr = 0 (GLM-5.3), rotary off (Kimi Linear), q and kv latents scaled
  // (LongCat-Flash), each through every save= path, against the float64 re-implementation.
  const int64_t dr = GENERATE(0, 6);
  const bool rotary = GENERATE(true, false);
  const std::string save = GENERATE("q", "q_latent", "latent");
  CAPTURE(dr, rotary, save);
  const auto o = small_options(true, true).qk_rope_head_dim(dr).rotary(rotary).q_scale(1.7).kv_scale(0.6).save(save);
  auto attn = make_module(o, torch::kDouble, 0);
  torch::manual_seed(1);
  const auto x = torch::randn({2, 13, 32}, torch::kDouble).requires_grad_(true);
  check_same_results(attn(x), ref_attention(*attn, x, torch::arange(13), plain_rope(o)), *attn, x);
}

TEST_CASE("The latent-only block's head groups leave the result as Hugging Face's in float64", "[module]") {
  // docs/design.md §13.6: the 3 heads in one group or in two (2 + 1); the default (3 groups) is
  // covered above.
  const int64_t head_chunks = GENERATE(1, 2);
  CAPTURE(head_chunks);
  const auto o = small_options(true, true).save("latent").head_chunks(head_chunks);
  auto attn = make_module(o, torch::kDouble, 0);
  torch::manual_seed(1);
  const auto x = torch::randn({2, 13, 32}, torch::kDouble).requires_grad_(true);
  check_same_results(attn(x), ref_attention(*attn, x, torch::arange(13), plain_rope(o)), *attn, x);
}

TEST_CASE("MultiHeadLatentAttention refuses head_chunks below 1", "[module]") {
  REQUIRE_THROWS_AS(torch_mla::MultiHeadLatentAttention(small_options(true, true).head_chunks(0)), c10::ValueError);
  REQUIRE_THROWS_WITH(torch_mla::MultiHeadLatentAttention(small_options(true, true).head_chunks(0)),
                      Catch::Contains("head_chunks must be >= 1, got 0"));
}

TEST_CASE("MultiHeadLatentAttention in float32 is within 1e-5 of the float64 module", "[module]") {
  const auto o = small_options(true, true);
  auto attn64 = make_module(o, torch::kDouble, 0);
  auto attn32 = std::dynamic_pointer_cast<torch_mla::MultiHeadLatentAttentionImpl>(attn64->clone());
  attn32->to(torch::kFloat);
  torch::manual_seed(2);
  const auto x = torch::randn({2, 40, 32}, torch::kDouble);
  const auto out32 = attn32->forward(x.to(torch::kFloat));
  CHECK(out32.scalar_type() == torch::kFloat);
  CHECK(max_rel_err(out32, attn64(x)) <= 1e-5);
}

TEST_CASE("YaRN scales the softmax by mscale^2 and blends the RoPE frequencies", "[module][yarn]") {
  const double factor = 40.0;
  auto o = small_options(true, true);
  o.rope_scaling(torch_mla::YarnScaling().factor(factor).mscale(0.707).mscale_all_dim(1.0)
                     .original_max_position_embeddings(64));
  auto attn = make_module(o, torch::kDouble, 0);

  const double mscale_all = 0.1 * 1.0 * std::log(factor) + 1.0;
  RefRope rope;
  rope.softmax_scale = 1.0 / std::sqrt(14.0) * mscale_all * mscale_all;
  rope.factor = (0.1 * 0.707 * std::log(factor) + 1.0) / mscale_all;
  CHECK(attn->softmax_scale() == Approx(rope.softmax_scale).epsilon(1e-14));
  CHECK(attn->rope_attention_factor() == Approx(rope.factor).epsilon(1e-14));

  // Fastest frequencies (many turns within the original 64 positions) are kept, the slowest are
  // divided by the factor, and the blend never leaves that range.
  const auto plain = plain_rope(o).inv_freq;
  rope.inv_freq = attn->rope_inv_freq(torch::kDouble);
  REQUIRE(rope.inv_freq.sizes() == plain.sizes());
  CHECK(rope.inv_freq[0].item<double>() == Approx(plain[0].item<double>()).epsilon(1e-14));
  CHECK(rope.inv_freq[-1].item<double>() == Approx(plain[-1].item<double>() / factor).epsilon(1e-14));
  CHECK((rope.inv_freq <= plain * (1 + 1e-14)).all().item<bool>());
  CHECK((rope.inv_freq >= plain / factor * (1 - 1e-14)).all().item<bool>());

  torch::manual_seed(1);
  const auto x = torch::randn({2, 11, 32}, torch::kDouble);
  CHECK(max_rel_err(attn(x), ref_attention(*attn, x, torch::arange(11), rope)) <= 1e-12);
}

TEST_CASE("MultiHeadLatentAttention on packed sequences equals each sequence alone", "[module][varlen]") {
  auto attn = make_module(small_options(true, true), torch::kDouble, 0);
  const std::vector<int32_t> seqlens{1, 6, 9};
  torch::manual_seed(3);
  const auto x = torch::randn({16, 32}, torch::kDouble).requires_grad_(true);
  const auto packed = attn(x, std::nullopt, cu_seqlens_of(seqlens));
  REQUIRE(packed.sizes() == x.sizes());
  std::vector<torch::Tensor> alone;
  int64_t start = 0;
  for (int32_t n : seqlens) {
    alone.push_back(attn(x.narrow(0, start, n).unsqueeze(0))[0]);
    start += n;
  }
  check_same_results(packed, torch::cat(alone), *attn, x);
}

TEST_CASE("MultiHeadLatentAttention's RoPE sees relative positions only", "[module]") {
  auto attn = make_module(small_options(false, true), torch::kDouble, 0);
  torch::manual_seed(4);
  const auto x = torch::randn({2, 10, 32}, torch::kDouble);
  const auto by_default = attn(x);
  // Shifting every position leaves q.k unchanged; reordering them does not.
  CHECK(max_rel_err(attn(x, torch::arange(10) + 37), by_default) <= 1e-12);
  CHECK(max_rel_err(attn(x, torch::arange(10).flip(0)), by_default) > 1e-3);
  // Per-sequence (B, S) positions.
  CHECK(max_rel_err(attn(x, torch::arange(10).expand({2, 10})), by_default) <= 1e-12);
}

TEST_CASE("MultiHeadLatentAttention rejects hidden_states of the wrong shape", "[module][errors]") {
  torch_mla::MultiHeadLatentAttention attn(small_options(true, true));
  REQUIRE_THROWS_WITH(attn(torch::randn({2, 5, 31})), Catch::Contains("hidden_states must have shape (B, S, hidden_size)"));
  REQUIRE_THROWS_WITH(attn(torch::randn({2, 5, 32}), std::nullopt, cu_seqlens_of({4, 6})),
                      Catch::Contains("hidden_states must have shape (T, hidden_size)"));
}

// The exact claim (the op keeps only out and lse) is test_functional.cpp's; this compares whole
// attention blocks.
TEST_CASE("MultiHeadLatentAttention keeps at least K and V fewer bytes than expanded attention",
          "[module][saved]") {
  auto o = small_options(true, true);
  o.num_heads(8);
  auto attn = make_module(o, torch::kDouble, 0);
  const int64_t batch = 2, seqlen = 32, tokens = batch * seqlen;
  CountingCpuAllocator::Scope counting;
  auto& alloc = CountingCpuAllocator::instance();
  torch::manual_seed(5);
  const auto x = torch::randn({batch, seqlen, 32}, torch::kDouble).requires_grad_(true);

  auto kept = [&](auto&& forward) {
    const int64_t before = alloc.live_bytes();
    const auto y = forward();
    return alloc.live_bytes() - before - storage_bytes(y);
  };
  const int64_t ours = kept([&] { return attn(x); });
  const int64_t naive = kept([&] { return ref_attention(*attn, x, torch::arange(seqlen), plain_rope(o)); });
  const int64_t kv_bytes = tokens * o.num_heads() * (o.qk_nope_head_dim() + o.v_head_dim()) *
                           static_cast<int64_t>(sizeof(double));
  WARN("module bytes kept for backward per token (float64, H=8): torch_mla " << ours / tokens
       << ", naive expanded K/V " << naive / tokens);
  CHECK(ours + kv_bytes <= naive);
}

TEST_CASE("MultiHeadLatentAttention records each forward's maximum logit when asked", "[module][max_logits]") {
  auto o = small_options(true, true);
  auto off = make_module(o, torch::kDouble, 0);
  auto on = make_module(o.record_max_logits(true), torch::kDouble, 0);
  torch::manual_seed(5);
  const auto x = torch::randn({2, 9, 32}, torch::kDouble);
  CHECK_FALSE(on->max_logits.defined());
  // Recording changes nothing else, and costs nothing when off.
  CHECK(torch::equal(on(x), off(x)));
  CHECK_FALSE(off->max_logits.defined());
  REQUIRE(on->max_logits.sizes() == torch::IntArrayRef{o.num_heads()});
  CHECK_FALSE(on->max_logits.requires_grad());
  const auto first = on->max_logits;
  // A batch is the maximum of its sequences: each alone gives at most it, and one of them equals it.
  on(x.narrow(0, 0, 1));
  const auto a = on->max_logits;
  on(x.narrow(0, 1, 1));
  const auto b = on->max_logits;
  CHECK(max_rel_err(torch::maximum(a, b), first) <= 1e-12);
  // save "q_latent" records the same values; the latent-only block refuses to record.
  auto q_latent = make_module(o.save("q_latent"), torch::kDouble, 0);
  q_latent(x);
  CHECK(max_rel_err(q_latent->max_logits, first) <= 1e-12);
  auto latent = make_module(o.save("latent"), torch::kDouble, 0);
  REQUIRE_THROWS_AS(latent(x), c10::ValueError);
  REQUIRE_THROWS_WITH(latent(x), Catch::Contains("record_max_logits needs save='q' or save='q_latent'"));
}
