#pragma once
// The latent layer (docs/design.md §4.3), written once for every core: K and V are expanded from
// the latent into a transient buffer before a core runs, and the core's per-head gradients are
// projected back onto the latent after its backward.
#include <ATen/core/Tensor.h>

namespace torch_mla {

// KV = kv_latent · wkv_bᵀ viewed (T, H, Dn+Dv): per head [k_nope | v], wkv_b's row layout.
// kv_latent (T, Dc), wkv_b (H·(Dn+Dv), Dc); one GEMM in their dtype.
at::Tensor expand_kv(const at::Tensor& kv_latent, const at::Tensor& wkv_b, int64_t heads);

struct LatentGrads {
  at::Tensor kv_latent;  // (T, Dc) = dKV · wkv_b
  at::Tensor wkv_b;      // (H·(Dn+Dv), Dc) = dKVᵀ · kv_latent
  at::Tensor k_rope;     // (T, Dr): the core's dk_rope, summed over heads where it is per head
};

// The gradients of the latent-side inputs from the core's grad_kv (T, H, Dn+Dv) and grad_k_rope,
// (T, Dr) or (T, H, Dr). Results are in kv_latent's dtype; grad_kv is rounded to it first, as the
// GEMMs run in the inputs' dtype.
LatentGrads project_kv_grads(const at::Tensor& grad_kv, const at::Tensor& grad_k_rope,
                             const at::Tensor& kv_latent, const at::Tensor& wkv_b);

// [k_nope | k_rope] per head, (T, H, Dn+Dr), contiguous: for cores that take one K tensor. k_rope
// (T, Dr) is broadcast over the heads inside this transient buffer only.
at::Tensor concat_k(const at::Tensor& kv, const at::Tensor& k_rope, int64_t dim_nope);

// The transposes of concat_k and of V = kv[..., Dn:]: [dk_nope | dv] per head, and dk_rope per head.
struct SplitKGrads {
  at::Tensor grad_kv;      // (T, H, Dn+Dv)
  at::Tensor grad_k_rope;  // (T, H, Dr)
};
SplitKGrads split_k_grads(const at::Tensor& grad_k, const at::Tensor& grad_v, int64_t dim_nope);

}  // namespace torch_mla
