// Calls torch_mla::mla_attention by its schema name only (no torch_mla header, no symbol), as a
// TorchScript or AOTInductor runtime would, and checks its output is finite and shaped.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

int main() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"torch_mla::mla_attention", ""});
  if (!handle) {
    std::fprintf(stderr, "torch_mla::mla_attention is not registered: libtorch_mla was not loaded\n");
    return 1;
  }
  const auto op = handle->typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool,
      const std::optional<at::Tensor>&, c10::SymInt, c10::string_view, bool)>();
  const int64_t batch = 2, seqlen = 5, heads = 2, dim_nope = 8, dim_rope = 4, dim_v = 8, dim_latent = 16;
  const auto q = at::randn({batch, seqlen, heads, dim_nope + dim_rope});
  const auto kv_latent = at::randn({batch, seqlen, dim_latent});
  const auto k_rope = at::randn({batch, seqlen, dim_rope});
  const auto wkv_b = at::randn({heads * (dim_nope + dim_v), dim_latent});
  const auto [out, lse, max_logits] =
      op.call(q, kv_latent, k_rope, wkv_b, 0.25, true, std::nullopt, c10::SymInt(0), "auto", false);
  if (out.sizes() != at::IntArrayRef{batch, seqlen, heads, dim_v} || !out.isfinite().all().item<bool>()) {
    std::fprintf(stderr, "unexpected output of shape %s\n", c10::str(out.sizes()).c_str());
    return 1;
  }
  std::printf("dispatcher_only: torch_mla::mla_attention found and ran, out %s\n",
              c10::str(out.sizes()).c_str());
  return 0;
}
