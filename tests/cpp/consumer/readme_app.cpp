// A program written as the README says (#include <torch/torch.h> and <torch_mla/torch_mla.h>,
// linked with TorchMLA::torch_mla): one forward and backward through the functional op and the
// module. tests/test_packaging.py builds it against the installed wheel twice, the TorchMLA
// library first on the link line and Torch first, and runs both: libtorch_mla must find its own
// torch libraries (its RUNPATH) whichever the loader meets first.
#include <torch/torch.h>
#include <torch/version.h>
#include <torch_mla/torch_mla.h>

#include <cstdio>

int main() {
  torch::manual_seed(0);
  const int64_t batch = 2, seqlen = 16, heads = 2, dim_nope = 16, dim_rope = 8, dim_v = 16, dim_latent = 32;
  auto q = torch::randn({batch, seqlen, heads, dim_nope + dim_rope}, torch::requires_grad());
  auto kv_latent = torch::randn({batch, seqlen, dim_latent}, torch::requires_grad());
  auto k_rope = torch::randn({batch, seqlen, dim_rope}, torch::requires_grad());
  auto wkv_b = torch::randn({heads * (dim_nope + dim_v), dim_latent}, torch::requires_grad());
  auto out = torch_mla::mla_attention(q, kv_latent, k_rope, wkv_b, torch_mla::MlaOptions().causal(true));
  out.sum().backward();

  torch_mla::MultiHeadLatentAttention attn(torch_mla::MultiHeadLatentAttentionOptions(64, 4)
      .q_lora_rank(32).kv_lora_rank(32).qk_nope_head_dim(16).qk_rope_head_dim(8).v_head_dim(16));
  auto x = torch::randn({batch, seqlen, 64}, torch::requires_grad());
  auto y = attn->forward(x);
  y.sum().backward();

  const bool ok = out.sizes() == torch::IntArrayRef{batch, seqlen, heads, dim_v} &&
                  y.sizes() == x.sizes() && q.grad().isfinite().all().item<bool>() &&
                  x.grad().isfinite().all().item<bool>();
  std::printf("readme_app: torch %s, mla_attention out %s, MultiHeadLatentAttention out %s, grads %s\n",
              TORCH_VERSION, c10::str(out.sizes()).c_str(), c10::str(y.sizes()).c_str(),
              ok ? "finite" : "WRONG");
  return ok ? 0 : 1;
}
