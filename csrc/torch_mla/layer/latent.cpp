#include "torch_mla/layer/latent.h"

#include <ATen/ATen.h>

namespace torch_mla {

at::Tensor expand_kv(const at::Tensor& kv_latent, const at::Tensor& wkv_b, int64_t heads) {
  return at::mm(kv_latent, wkv_b.t()).view({kv_latent.size(0), heads, -1});
}

LatentGrads project_kv_grads(const at::Tensor& grad_kv, const at::Tensor& grad_k_rope,
                             const at::Tensor& kv_latent, const at::Tensor& wkv_b) {
  const int64_t tokens = grad_kv.size(0);
  const at::Tensor dkv = grad_kv.to(kv_latent.scalar_type()).reshape({tokens, -1});
  const at::Tensor dk_rope = grad_k_rope.dim() == 3 ? grad_k_rope.sum(1) : grad_k_rope;
  return {at::mm(dkv, wkv_b), at::mm(dkv.t(), kv_latent), dk_rope.to(kv_latent.scalar_type())};
}

at::Tensor concat_k(const at::Tensor& kv, const at::Tensor& k_rope, int64_t dim_nope) {
  const int64_t tokens = kv.size(0), heads = kv.size(1), dim_rope = k_rope.size(-1);
  at::Tensor k = at::empty({tokens, heads, dim_nope + dim_rope}, kv.options());
  k.narrow(2, 0, dim_nope).copy_(kv.narrow(2, 0, dim_nope));
  k.narrow(2, dim_nope, dim_rope).copy_(k_rope.unsqueeze(1).expand({tokens, heads, dim_rope}));
  return k;
}

SplitKGrads split_k_grads(const at::Tensor& grad_k, const at::Tensor& grad_v, int64_t dim_nope) {
  const int64_t dim_rope = grad_k.size(2) - dim_nope;
  return {at::cat({grad_k.narrow(2, 0, dim_nope), grad_v}, 2), grad_k.narrow(2, dim_nope, dim_rope)};
}

}  // namespace torch_mla
