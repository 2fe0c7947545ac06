#pragma once
// Helpers of the C++ tests: random MLA inputs, the naive reference (expanded K/V, full softmax;
// docs/design.md §4 written with plain ATen ops), the accuracy measure of docs/design.md §8, and a CPU
// allocator that counts live bytes (C++ has no saved-tensor hooks without Python).
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>
#include <torch_mla/torch_mla.h>
// After torch: c10's logging defines a CHECK macro of its own, which Catch's must replace.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

namespace torch_mla_test {

struct Dims {
  int64_t heads = 3, nope = 8, rope = 4, v = 6, latent = 16;
};

struct Inputs {
  torch::Tensor q, kv_latent, k_rope, wkv_b;
  std::vector<torch::Tensor> list() const { return {q, kv_latent, k_rope, wkv_b}; }
};

// Unit-scale inputs; wkv_b scaled by Dc^-0.5 so K and V have unit variance. `lead` is (B, S) for a
// padded batch or (T,) packed.
inline Inputs make_inputs(const Dims& d, std::vector<int64_t> lead, torch::Dtype dtype, uint64_t seed) {
  torch::manual_seed(seed);
  auto rand = [&](std::vector<int64_t> shape, double scale = 1.0) {
    return (torch::randn(shape, torch::kDouble) * scale).to(dtype).requires_grad_(true);
  };
  auto with = [&](std::vector<int64_t> tail) {
    std::vector<int64_t> s = lead;
    s.insert(s.end(), tail.begin(), tail.end());
    return s;
  };
  return {rand(with({d.heads, d.nope + d.rope})), rand(with({d.latent})), rand(with({d.rope})),
          rand({d.heads * (d.nope + d.v), d.latent}, 1.0 / std::sqrt(static_cast<double>(d.latent)))};
}

inline torch::Tensor cu_seqlens_of(const std::vector<int32_t>& seqlens) {
  std::vector<int32_t> cu{0};
  for (int32_t n : seqlens) cu.push_back(cu.back() + n);
  return torch::tensor(cu, torch::kInt);
}

// The specification's scaled, masked scores (B, H, S, S) and V (B, S, H, Dv), padded.
inline std::pair<torch::Tensor, torch::Tensor> naive_scores(const torch::Tensor& q, const torch::Tensor& kv_latent,
                                                            const torch::Tensor& k_rope, const torch::Tensor& wkv_b,
                                                            double scale, bool causal) {
  using torch::indexing::Slice;
  const int64_t heads = q.size(-2), dim_rope = k_rope.size(-1), dim_nope = q.size(-1) - dim_rope;
  const auto kv = torch::matmul(kv_latent, wkv_b.t()).unflatten(-1, {heads, -1});
  const auto k_nope = kv.index({"...", Slice(0, dim_nope)});
  const auto v = kv.index({"...", Slice(dim_nope, torch::indexing::None)});
  const auto k = torch::cat({k_nope, k_rope.unsqueeze(-2).expand({-1, -1, heads, dim_rope})}, -1);
  auto scores = torch::einsum("bshd,bthd->bhst", {q, k}) * scale;
  if (causal) {
    const int64_t s = q.size(1);
    scores = scores.masked_fill(torch::ones({s, s}, torch::kBool).triu(1), -INFINITY);
  }
  return {scores, v};
}

// The specification, padded: q (B, S, H, Dn+Dr), ... -> out (B, S, H, Dv). Differentiable.
inline torch::Tensor naive_mla(const torch::Tensor& q, const torch::Tensor& kv_latent,
                               const torch::Tensor& k_rope, const torch::Tensor& wkv_b,
                               double scale, bool causal) {
  const auto [scores, v] = naive_scores(q, kv_latent, k_rope, wkv_b, scale, causal);
  return torch::einsum("bhst,bthd->bshd", {torch::softmax(scores, -1), v});
}

// The specification's maximum logit per head (docs/design.md §12), padded: (H,).
inline torch::Tensor naive_max_logits(const torch::Tensor& q, const torch::Tensor& kv_latent,
                                      const torch::Tensor& k_rope, const torch::Tensor& wkv_b,
                                      double scale, bool causal) {
  return naive_scores(q, kv_latent, k_rope, wkv_b, scale, causal).first.transpose(0, 1).flatten(1).amax(1);
}

// Packed: each sequence of cu_seqlens through naive_mla on its own.
inline torch::Tensor naive_mla_packed(const Inputs& x, const torch::Tensor& cu_seqlens, double scale,
                                      bool causal) {
  std::vector<torch::Tensor> outs;
  const auto cu = cu_seqlens.to(torch::kLong);
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    const int64_t start = cu[b].item<int64_t>(), len = cu[b + 1].item<int64_t>() - start;
    outs.push_back(naive_mla(x.q.narrow(0, start, len).unsqueeze(0),
                             x.kv_latent.narrow(0, start, len).unsqueeze(0),
                             x.k_rope.narrow(0, start, len).unsqueeze(0), x.wkv_b, scale, causal)[0]);
  }
  return torch::cat(outs);
}

// max|x - ref| / max(max|ref|, 1): results are unit scale, the floor guards exact zeros.
inline double max_rel_err(const torch::Tensor& x, const torch::Tensor& ref) {
  if (ref.numel() == 0) return 0.0;
  const auto r = ref.detach().to(torch::kDouble);
  const double diff = (x.detach().to(torch::kDouble) - r).abs().max().item<double>();
  return diff / std::max(r.abs().max().item<double>(), 1.0);
}

// Gradients of `out` w.r.t. `leaves` for a fixed random grad_out (zeros where unused).
inline std::vector<torch::Tensor> grads_of(const torch::Tensor& out, const std::vector<torch::Tensor>& leaves,
                                           uint64_t seed = 1) {
  torch::manual_seed(seed);
  const auto grad_out = torch::randn(out.sizes(), torch::kDouble).to(out.scalar_type());
  auto grads = torch::autograd::grad({out}, leaves, {grad_out}, /*retain_graph=*/false,
                                     /*create_graph=*/false, /*allow_unused=*/true);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = torch::zeros_like(leaves[i]);
  }
  return grads;
}

// Counts the bytes of live CPU allocations. Installed over the default CPU allocator for the
// lifetime of a CountingCpuAllocator::Scope; the bytes an autograd graph keeps alive after the
// forward are exactly what it saved beyond tensors that were alive anyway.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  static CountingCpuAllocator& instance() {
    static CountingCpuAllocator a;
    return a;
  }
  int64_t live_bytes() const { return live_.load(); }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = c10::GetDefaultCPUAllocator()->allocate(n);
    void* data = inner.get();
    live_ += static_cast<int64_t>(n);
    auto* ctx = new Block{std::move(inner), n};
    return {data, ctx, &CountingCpuAllocator::free_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Routes CPU allocations through the counter while alive (the highest priority wins).
  struct Scope {
    Scope() : previous(c10::GetCPUAllocator()) { c10::SetCPUAllocator(&instance(), kPriority); }
    ~Scope() { c10::SetCPUAllocator(previous, kPriority); }
    c10::Allocator* previous;
  };

 private:
  static constexpr uint8_t kPriority = 100;
  struct Block {
    c10::DataPtr inner;
    size_t bytes;
  };
  static void free_block(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    instance().live_ -= static_cast<int64_t>(block->bytes);
    delete block;
  }
  std::atomic<int64_t> live_{0};
};

inline int64_t storage_bytes(const torch::Tensor& t) { return static_cast<int64_t>(t.storage().nbytes()); }

}  // namespace torch_mla_test
