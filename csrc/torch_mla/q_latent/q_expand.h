#pragma once
// The q expansion of the q-latent op and its transpose, in plain ATen so that every backend and
// the Meta/fake path share them: q = [q_nope | rope(q_rope)] per head, from c_q · wq_bᵀ.
#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_mla {

// Checks the q-latent-only arguments (q_latent, wq_b, cos, sin, num_heads) against k_rope and
// cu_seqlens; the rest is checked by mla_attention itself.
void check_q_latent_inputs(
    const at::Tensor& q_latent,
    const at::Tensor& wq_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    const at::Tensor& k_rope,
    int64_t num_heads,
    const std::optional<at::Tensor>& cu_seqlens);

// q (…, H, Dn+Dr) = c_q · wq_bᵀ per head, q_rope not yet rotated; fresh and contiguous.
at::Tensor project_q(const at::Tensor& q_latent, const at::Tensor& wq_b, int64_t num_heads);

// The last Dr = 2·cos.size(-1) dims of q (…, H, Dn+Dr), as a view.
at::Tensor rope_part(const at::Tensor& q, const at::Tensor& cos);

// Rotates q's rope part in place: o1 = x1·cos − x2·sin, o2 = x2·cos + x1·sin for every pair
// (x1, x2), computed in float for bf16/fp16. Pairs are (2i, 2i+1) with rope_interleave, else
// (i, i+Dr/2).
void rotate_q_(at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin, bool rope_interleave);

struct ExpandQGrads {
  at::Tensor q_latent, wq_b, cos, sin;  // undefined where not asked for
};

// The vector-Jacobian product of project_q + rotate_q_ for grad_q (…, H, Dn+Dr), which it
// overwrites. q_rope is the unrotated rope part of q, needed (and read) only for the cos/sin grads.
ExpandQGrads expand_q_backward(
    at::Tensor grad_q,
    const at::Tensor& q_rope,
    const at::Tensor& q_latent,
    const at::Tensor& wq_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    bool rope_interleave,
    bool need_q_latent,
    bool need_wq_b,
    bool need_rope);

}  // namespace torch_mla
