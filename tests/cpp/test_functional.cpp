// torch_mla::mla_attention (C++ API) against the naive reference: forward, backward, varlen,
// causal and not, options, argument errors, and what the autograd graph keeps alive.
#include <cmath>
#include <string>

#include "test_support.h"  // torch, torch_mla and Catch, in the order they need

using namespace torch_mla_test;

namespace {

double default_scale(const Dims& d) { return 1.0 / std::sqrt(static_cast<double>(d.nope + d.rope)); }

}  // namespace

TEST_CASE("mla_attention forward and backward match the naive reference in float64",
          "[functional]") {
  const bool causal = GENERATE(true, false);
  const int64_t seqlen = GENERATE(1, 7, 63, 65);
  CAPTURE(causal, seqlen);
  const Dims d;
  const Inputs x = make_inputs(d, {2, seqlen}, torch::kDouble, 0);

  const auto out = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b,
                                            torch_mla::MlaOptions().causal(causal));
  const auto ref = naive_mla(x.q, x.kv_latent, x.k_rope, x.wkv_b, default_scale(d), causal);
  REQUIRE(out.sizes() == ref.sizes());
  CHECK(max_rel_err(out, ref) <= 1e-12);

  const auto grads = grads_of(out, x.list());
  const auto ref_grads = grads_of(ref, x.list());
  const char* names[] = {"q", "kv_latent", "k_rope", "wkv_b"};
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(names[i]);
    CHECK(max_rel_err(grads[i], ref_grads[i]) <= 1e-12);
  }
}

TEST_CASE("mla_attention's autograd node is torch_mla's C++ Function", "[functional]") {
  const Inputs x = make_inputs(Dims{}, {1, 4}, torch::kDouble, 0);
  const auto out = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b);
  REQUIRE(out.grad_fn() != nullptr);
  CHECK_THAT(out.grad_fn()->name(), Catch::Contains("MlaAttentionFunction"));
  // Its inputs are exactly the four differentiable arguments.
  CHECK(out.grad_fn()->next_edges().size() == 4);
}

// Runs a scope on one intra-op thread. Two identical calls of the composed core in float64 on two
// threads differed in about 1 of 40 processes on a loaded machine (its ATen and BLAS calls split
// their work by thread); on one thread none of 100 did. A bit-for-bit comparison needs that.
class OneThread {
 public:
  OneThread() { at::set_num_threads(1); }
  ~OneThread() { at::set_num_threads(threads_); }

 private:
  int threads_ = at::get_num_threads();
};

TEST_CASE("mla_attention_with_max_logits gives the reference's maximum logit per head", "[functional][max_logits]") {
  const bool causal = GENERATE(true, false);
  const std::string core = GENERATE(as<std::string>{}, "cpu", "composed");
  CAPTURE(causal, core);
  const Dims d;
  const Inputs x = make_inputs(d, {2, 37}, torch::kDouble, 5);
  const auto options = torch_mla::MlaOptions().causal(causal).core(core);
  const OneThread one_thread;
  const auto [out, max_logits] = torch_mla::mla_attention_with_max_logits(x.q, x.kv_latent, x.k_rope, x.wkv_b, options);
  const auto ref = naive_max_logits(x.q, x.kv_latent, x.k_rope, x.wkv_b, default_scale(d), causal);
  REQUIRE(max_logits.sizes() == torch::IntArrayRef{d.heads});
  CHECK(max_logits.scalar_type() == torch::kDouble);
  CHECK_FALSE(max_logits.requires_grad());
  CHECK(max_rel_err(max_logits, ref) <= 1e-12);
  // The same out as the plain call, bit for bit (on one thread: OneThread).
  CHECK(torch::equal(out, torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b, options)));
}

TEST_CASE("mla_attention in float32 is within 1e-5 of the float64 reference", "[functional]") {
  const Dims d{4, 32, 16, 32, 64};
  const Inputs x = make_inputs(d, {2, 70}, torch::kFloat, 3);
  const auto out = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b);
  auto as_double = [](const torch::Tensor& t) { return t.detach().to(torch::kDouble).requires_grad_(true); };
  const Inputs x64{as_double(x.q), as_double(x.kv_latent), as_double(x.k_rope), as_double(x.wkv_b)};
  const auto ref = naive_mla(x64.q, x64.kv_latent, x64.k_rope, x64.wkv_b, default_scale(d), true);
  CHECK(out.scalar_type() == torch::kFloat);
  CHECK(max_rel_err(out, ref) <= 1e-5);
  const auto grads = grads_of(out, x.list());
  const auto ref_grads = grads_of(ref, x64.list());
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(i);
    CHECK(max_rel_err(grads[i], ref_grads[i]) <= 1e-5);
  }
}

TEST_CASE("MlaOptions default to causal with scale (Dn+Dr)^-0.5 and honour softmax_scale",
          "[functional]") {
  const Dims d;
  const Inputs x = make_inputs(d, {2, 9}, torch::kDouble, 5);
  const auto by_default = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b);
  CHECK(max_rel_err(by_default, naive_mla(x.q, x.kv_latent, x.k_rope, x.wkv_b, default_scale(d), true)) <= 1e-12);

  const double scale = 0.9;
  const auto scaled = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b,
                                               torch_mla::MlaOptions().softmax_scale(scale));
  CHECK(max_rel_err(scaled, naive_mla(x.q, x.kv_latent, x.k_rope, x.wkv_b, scale, true)) <= 1e-12);
  // The two scales give different attention, so the comparison above can tell them apart.
  CHECK(max_rel_err(scaled, by_default) > 1e-3);
  CHECK(torch_mla::default_softmax_scale(x.q) == Approx(default_scale(d)).epsilon(1e-15));
}

TEST_CASE("mla_attention on packed sequences equals each sequence alone", "[functional][varlen]") {
  const bool causal = GENERATE(true, false);
  const bool give_max_seqlen = GENERATE(true, false);
  CAPTURE(causal, give_max_seqlen);
  const std::vector<int32_t> seqlens{1, 65, 2, 63, 1};
  const auto cu_seqlens = cu_seqlens_of(seqlens);
  const Dims d{2, 16, 8, 16, 32};
  const Inputs x = make_inputs(d, {cu_seqlens[-1].item<int64_t>()}, torch::kDouble, 7);

  const auto out = torch_mla::mla_attention(
      x.q, x.kv_latent, x.k_rope, x.wkv_b,
      torch_mla::MlaOptions().causal(causal).cu_seqlens(cu_seqlens).max_seqlen(give_max_seqlen ? 65 : 0));
  const auto ref = naive_mla_packed(x, cu_seqlens, default_scale(d), causal);
  REQUIRE(out.sizes() == ref.sizes());
  CHECK(max_rel_err(out, ref) <= 1e-12);
  const auto grads = grads_of(out, x.list());
  const auto ref_grads = grads_of(ref, x.list());
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(i);
    CHECK(max_rel_err(grads[i], ref_grads[i]) <= 1e-12);
  }
}

TEST_CASE("MlaOptions().core forces an attention core and explain says which and why", "[cores]") {
  const Dims d;
  const Inputs x = make_inputs(d, {2, 9}, torch::kDouble, 0);
  const std::string chosen = torch_mla::explain(x.q, x.kv_latent, x.k_rope, x.wkv_b);
  CHECK(chosen.rfind("cpu\n", 0) == 0);
  CHECK_THAT(chosen, Catch::Contains("cuda: no: runs on CUDA tensors only"));
  CHECK(torch_mla::explain(x.q, x.kv_latent, x.k_rope, x.wkv_b, torch_mla::MlaOptions().core("composed"))
            .rfind("composed\n", 0) == 0);

  // Both CPU cores compute the same function: within rounding of each other in float64.
  const auto on_cpu = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b, torch_mla::MlaOptions().core("cpu"));
  const auto composed =
      torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b, torch_mla::MlaOptions().core("composed"));
  CHECK(max_rel_err(composed, on_cpu) <= 1e-12);
  const auto grads = grads_of(composed, x.list());
  const auto ref_grads = grads_of(on_cpu, x.list());
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(i);
    CHECK(max_rel_err(grads[i], ref_grads[i]) <= 1e-12);
  }
  REQUIRE_THROWS_WITH(
      torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b, torch_mla::MlaOptions().core("cudnn")),
      Catch::Contains("core \"cudnn\" cannot serve this call: runs on CUDA tensors only"));
}

TEST_CASE("mla_attention rejects bad arguments with a message naming the argument", "[errors]") {
  const Dims d;
  const Inputs x = make_inputs(d, {2, 5}, torch::kDouble, 0);
  const auto cu_seqlens = cu_seqlens_of({4, 6});
  const Inputs packed = make_inputs(d, {10}, torch::kDouble, 0);
  using torch_mla::mla_attention;
  using torch_mla::MlaOptions;

  SECTION("q of the wrong rank") {
    REQUIRE_THROWS_AS(mla_attention(x.q[0], x.kv_latent, x.k_rope, x.wkv_b), c10::ValueError);
    REQUIRE_THROWS_WITH(mla_attention(x.q[0], x.kv_latent, x.k_rope, x.wkv_b),
                        Catch::Contains("q must have shape (B, S, H, Dn+Dr)"));
  }
  SECTION("kv_latent of another dtype") {
    REQUIRE_THROWS_WITH(mla_attention(x.q, x.kv_latent.to(torch::kFloat), x.k_rope, x.wkv_b),
                        Catch::Contains("kv_latent must have the same dtype as q"));
  }
  SECTION("k_rope of another sequence length") {
    REQUIRE_THROWS_WITH(mla_attention(x.q, x.kv_latent, x.k_rope.narrow(1, 0, 4), x.wkv_b),
                        Catch::Contains("k_rope must have shape (B, S, Dr)"));
  }
  SECTION("wkv_b not matching the latent width") {
    REQUIRE_THROWS_WITH(mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b.narrow(1, 0, d.latent - 1)),
                        Catch::Contains("wkv_b must have shape (H*(Dn+Dv), Dc)"));
  }
  SECTION("cu_seqlens of the wrong dtype") {
    REQUIRE_THROWS_WITH(mla_attention(packed.q, packed.kv_latent, packed.k_rope, packed.wkv_b,
                                      MlaOptions().cu_seqlens(cu_seqlens.to(torch::kLong))),
                        Catch::Contains("cu_seqlens must be int32"));
  }
  SECTION("cu_seqlens not ending at T") {
    REQUIRE_THROWS_WITH(mla_attention(packed.q, packed.kv_latent, packed.k_rope, packed.wkv_b,
                                      MlaOptions().cu_seqlens(cu_seqlens_of({4, 5}))),
                        Catch::Contains("cu_seqlens must end at T = 10"));
  }
  SECTION("max_seqlen below the longest sequence") {
    REQUIRE_THROWS_WITH(mla_attention(packed.q, packed.kv_latent, packed.k_rope, packed.wkv_b,
                                      MlaOptions().cu_seqlens(cu_seqlens).max_seqlen(5)),
                        Catch::Contains("max_seqlen (5)"));
  }
}

TEST_CASE("the autograd graph keeps only out and lse beyond its inputs", "[saved]") {
  const Dims d{4, 16, 8, 16, 32};
  const int64_t batch = 2, seqlen = 64;
  const double scale = default_scale(d);
  CountingCpuAllocator::Scope counting;
  auto& alloc = CountingCpuAllocator::instance();
  const Inputs x = make_inputs(d, {batch, seqlen}, torch::kDouble, 0);

  int64_t ours = 0;
  {
    const int64_t before = alloc.live_bytes();
    // The raw op (same dispatcher path and autograd Function) also hands back lse to measure it.
    auto [out, lse, max_logits] = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b, scale, true,
                                                           std::nullopt, c10::SymInt(0));
    ours = alloc.live_bytes() - before;
    // q, kv_latent, k_rope and wkv_b are saved by reference; the only new storage the graph
    // keeps is the op's own outputs. K and V (H*(Dn+Dv) per token) are not kept.
    CHECK(ours == storage_bytes(out) + storage_bytes(lse) + storage_bytes(max_logits));
    CHECK(max_logits.numel() == 0);  // not asked for
    CHECK(out.grad_fn() != nullptr);
    // The graph is whole: backward still runs, and afterwards nothing is left behind.
    const auto grads = grads_of(out, x.list());
    CHECK(grads[1].abs().sum().item<double>() > 0);
  }

  int64_t naive = 0;
  {
    const int64_t before = alloc.live_bytes();
    const auto ref = naive_mla(x.q, x.kv_latent, x.k_rope, x.wkv_b, scale, true);
    naive = alloc.live_bytes() - before - storage_bytes(ref);
  }
  const int64_t tokens = batch * seqlen;
  const int64_t kv_bytes = tokens * d.heads * (d.nope + d.v) * static_cast<int64_t>(sizeof(double));
  WARN("bytes kept for backward per token (float64, H=" << d.heads << "): torch_mla "
       << ours / tokens << ", naive expanded K/V " << naive / tokens);
  CHECK(naive >= kv_bytes);
  CHECK(ours + kv_bytes <= naive);
}

TEST_CASE("dsa_indexer_topk (C++ API) selects by score descending, then position ascending", "[indexer]") {
  // Two heads, one dim: I(t, s) = w0·ReLU(q0·k_s) + w1·ReLU(q1·k_s), every product exact.
  const auto k = torch::tensor({1.0, -1.0, 2.0, 1.0, 0.0}).view({1, 5, 1});
  const auto q = torch::tensor({1.0, -1.0}).view({1, 1, 2, 1}).expand({1, 5, 2, 1}).contiguous();
  const auto w = torch::tensor({1.0, 0.5}).view({1, 1, 2}).expand({1, 5, 2}).contiguous();
  const auto [indices, scores] = torch_mla::dsa_indexer_topk(q, k, w, 3, std::nullopt, 0);
  REQUIRE(indices.sizes() == torch::IntArrayRef({1, 5, 3}));
  CHECK(indices.scalar_type() == torch::kInt);
  CHECK(scores.scalar_type() == torch::kFloat);  // float32 inputs (torch::tensor's default)
  // Scores per key: 1, 0.5, 2, 1, 0. Last row: 2 (s=2), then the tie 1 at s=0 and s=3: s=0 first.
  CHECK(torch::equal(indices[0][4], torch::tensor({2, 0, 3}, torch::kInt)));
  CHECK(torch::equal(scores[0][4], torch::tensor({2.0f, 1.0f, 1.0f})));
  // Row 1 sees two keys: both, then -1 with score -inf.
  CHECK(torch::equal(indices[0][1], torch::tensor({0, 1, -1}, torch::kInt)));
  CHECK(std::isinf(scores[0][1][2].item<float>()));
  CHECK_THROWS_WITH(torch_mla::dsa_indexer_topk(q, k, w, 0, std::nullopt, 0),
                    Catch::Contains("topk must be at least 1"));
}

TEST_CASE("mla_sparse_attention selecting every causal prefix equals mla_attention in float64", "[sparse]") {
  const int64_t seqlen = 6, k = 8;
  const Inputs x = make_inputs(Dims{}, {2, seqlen}, torch::kDouble, 0);
  // Row t of each sequence holds every position 0..S-1 (those past t are ignored) and -1 padding.
  auto row = torch::full({k}, -1, torch::kInt);
  row.narrow(0, 0, seqlen).copy_(torch::arange(seqlen, torch::kInt));
  const auto topk = row.expand({2, seqlen, k}).contiguous();
  const auto dense = torch_mla::mla_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b);
  // "composed" computes the absorbed form; the dense op computes the expanded one.
  const auto sparse = torch_mla::mla_sparse_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b, topk,
                                                      torch_mla::MlaOptions().core("composed"));
  CHECK(max_rel_err(sparse, dense) <= 1e-12);
  const auto grads = grads_of(sparse, x.list());
  const auto dense_grads = grads_of(dense, x.list());
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(i);
    CHECK(max_rel_err(grads[i], dense_grads[i]) <= 1e-12);
  }
  CHECK_THROWS_WITH(torch_mla::mla_sparse_attention(x.q, x.kv_latent, x.k_rope, x.wkv_b, topk,
                                                    torch_mla::MlaOptions().causal(false)),
                    Catch::Contains("sparse attention is causal only"));
}

TEST_CASE("dsa_indexer_loss (C++ API) equals the naive KL in float64 and trains only the indexer", "[indexer_loss]") {
  const Dims d;
  const int64_t batch = 2, seqlen = 7, index_heads = 3, index_dim = 5;
  const Inputs x = make_inputs(d, {batch, seqlen}, torch::kDouble, 3);
  torch::manual_seed(4);
  const auto index_q = torch::randn({batch, seqlen, index_heads, index_dim}, torch::kDouble).requires_grad_(true);
  const auto index_k = torch::randn({batch, seqlen, index_dim}, torch::kDouble).requires_grad_(true);
  const auto weights = torch::randn({batch, seqlen, index_heads}, torch::kDouble).requires_grad_(true);
  // The teacher: the attention's probabilities summed over heads, L1-normalised (sum = H), and its lse.
  const auto scores = naive_scores(x.q, x.kv_latent, x.k_rope, x.wkv_b, default_scale(d), true).first.detach();
  const auto lse = torch::logsumexp(scores, -1).transpose(1, 2).contiguous();  // (B, S, H)
  const auto p = torch::softmax(scores, -1).sum(1) / d.heads;                  // (B, S, S)
  auto index_scores = (torch::einsum("bshd,btd->bsht", {index_q, index_k}).relu() * weights.unsqueeze(-1)).sum(2);
  const auto later = torch::ones({seqlen, seqlen}, torch::kBool).triu(1);
  const auto log_q = torch::log_softmax(index_scores.masked_fill(later, -INFINITY), -1);
  const auto terms = p * (p.log() - log_q);
  const auto naive = torch::where(p > 0, terms, torch::zeros_like(terms)).sum(-1);

  const auto kl = torch_mla::dsa_indexer_loss(index_q, index_k, weights, x.q, x.kv_latent, x.k_rope, x.wkv_b, lse);
  REQUIRE(kl.sizes() == torch::IntArrayRef({batch, seqlen}));
  CHECK(kl.scalar_type() == torch::kDouble);
  CHECK(max_rel_err(kl, naive) <= 1e-12);
  // The teacher is detached: no gradient reaches q, the latents or wkv_b.
  const auto teacher = torch::autograd::grad({kl.sum()}, x.list(), {}, /*retain_graph=*/true, false,
                                             /*allow_unused=*/true);
  for (const auto& g : teacher) CHECK(!g.defined());
  const std::vector<torch::Tensor> indexer{index_q, index_k, weights};
  const auto grads = grads_of(kl, indexer);
  const auto naive_grads = grads_of(naive, indexer);
  for (size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(i);
    CHECK(max_rel_err(grads[i], naive_grads[i]) <= 1e-12);
  }

  // Sparse mode selecting every causal prefix is the dense loss.
  auto row = torch::arange(seqlen, torch::kInt);
  const auto topk = row.expand({batch, seqlen, seqlen}).contiguous();
  const auto sparse = torch_mla::dsa_indexer_loss(index_q, index_k, weights, x.q, x.kv_latent, x.k_rope, x.wkv_b, lse,
                                                  torch_mla::IndexerLossOptions().topk_indices(topk));
  CHECK(max_rel_err(sparse, kl) <= 1e-12);
  CHECK_THROWS_WITH(torch_mla::dsa_indexer_loss(index_q, index_k, weights, x.q, x.kv_latent, x.k_rope, x.wkv_b,
                                                lse.to(torch::kFloat)),
                    Catch::Contains("torch_mla.dsa_indexer_loss: lse must be Double"));
}
