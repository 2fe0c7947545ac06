#pragma once
// The q expansion of the q-latent op and its transpose, in plain ATen so that every core and
// the Meta/fake path share them: q = [q_nope | rope(q_rope)] per head, from c_q · wq_bᵀ.
#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_mla {

// Checks the q-latent-only arguments (q_latent, wq_b, cos, sin, num_heads) against k_rope and
// cu_seqlens; the rest is checked by mla_attention itself. `op` prefixes every message and
// `q_latent_name` names the q_latent argument in it (the block op passes its own).
void check_q_latent_inputs(
    const at::Tensor& q_latent,
    const at::Tensor& wq_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    const at::Tensor& k_rope,
    int64_t num_heads,
    const std::optional<at::Tensor>& cu_seqlens,
    const char* op = "torch_mla.mla_attention_q_latent: ",
    const char* q_latent_name = "q_latent");

// q (…, H, Dn+Dr) = c_q · wq_bᵀ per head, q_rope not yet rotated; fresh and contiguous.
at::Tensor project_q(const at::Tensor& q_latent, const at::Tensor& wq_b, int64_t num_heads);

// [q_nope | rope(q_rope)], a new tensor: each pair (x1, x2) of q_rope (the last
// Dr = 2·cos.size(-1) dims) becomes (x1·cos − x2·sin, x2·cos + x1·sin), computed in float for
// bf16/fp16. Pairs are (2i, 2i+1) with rope_interleave, else (i, i+Dr/2).
at::Tensor rotate_q(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin, bool rope_interleave);

struct RotateQGrads {
  at::Tensor q, cos, sin;  // undefined where not asked for
};

// The vector-Jacobian product of rotate_q for grad_q (…, H, Dn+Dr): the grad of its unrotated
// input q (need_q) and of cos and sin (need_rope, which reads q, the unrotated input).
RotateQGrads rotate_q_backward(
    const at::Tensor& grad_q,
    const at::Tensor& q,
    const at::Tensor& cos,
    const at::Tensor& sin,
    bool rope_interleave,
    bool need_q,
    bool need_rope);

struct ExpandQGrads {
  at::Tensor q_latent, wq_b, cos, sin;  // undefined where not asked for
};

// The vector-Jacobian product of rotate_q(project_q(q_latent, wq_b)) for grad_q (…, H, Dn+Dr).
// q_projected is project_q's result, read only for the cos/sin grads (need_rope).
ExpandQGrads expand_q_backward(
    const at::Tensor& grad_q,
    const at::Tensor& q_projected,
    const at::Tensor& q_latent,
    const at::Tensor& wq_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    bool rope_interleave,
    bool need_q_latent,
    bool need_wq_b,
    bool need_rope);

}  // namespace torch_mla
