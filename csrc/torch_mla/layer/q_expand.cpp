// The q expansion of the q-latent op and its transpose (layer/q_expand.h), in plain ATen.
#include "torch_mla/layer/q_expand.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <utility>
#include <vector>


namespace torch_mla {
namespace {

// The two halves of every rotated pair along the last dimension (views).
std::pair<at::Tensor, at::Tensor> split_pairs(const at::Tensor& x, bool interleave) {
  if (interleave) {
    return {x.slice(-1, 0, std::nullopt, 2), x.slice(-1, 1, std::nullopt, 2)};
  }
  const c10::SymInt half = x.sym_size(-1) / 2;
  return {x.narrow_symint(-1, 0, half), x.narrow_symint(-1, half, half)};
}

at::Tensor join_pairs(const at::Tensor& a, const at::Tensor& b, bool interleave) {
  return interleave ? at::stack({a, b}, -1).flatten(-2) : at::cat({a, b}, -1);
}

// Rotates every pair (x1, x2) of x (…, H, Dr) by cos/sin (…, Dr/2) in float for bf16/fp16, as
// Hugging Face's DeepSeek-V2 rotary does: o1 = x1·cos − x2·sin, o2 = x2·cos + x1·sin, or with the
// transposed rotation (the VJP) o1 = x1·cos + x2·sin, o2 = x2·cos − x1·sin. Returns x's dtype.
at::Tensor rotate_pairs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        bool interleave, bool transposed) {
  const auto opmath = at::toOpMathType(x.scalar_type());
  const at::Tensor c = cos.to(opmath).unsqueeze(-2), s = sin.to(opmath).unsqueeze(-2);
  const auto [x1, x2] = split_pairs(x.to(opmath), interleave);
  const at::Tensor o1 = transposed ? x1 * c + x2 * s : x1 * c - x2 * s;
  const at::Tensor o2 = transposed ? x2 * c - x1 * s : x2 * c + x1 * s;
  return join_pairs(o1, o2, interleave).to(x.scalar_type());
}

// [q_nope | rotate(q_rope)] as a new tensor: no in-place update, so that a backward recorded
// with create_graph=True stays valid.
at::Tensor rotate_rope_part(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin,
                            bool interleave, bool transposed) {
  const c10::SymInt dim_rope = cos.sym_size(-1) * 2;
  const c10::SymInt dim_nope = q.sym_size(-1) - dim_rope;
  return at::cat({q.narrow_symint(-1, 0, dim_nope),
                  rotate_pairs(q.narrow_symint(-1, dim_nope, dim_rope), cos, sin, interleave, transposed)},
                 -1);
}

}  // namespace

at::Tensor project_q(const at::Tensor& q_latent, const at::Tensor& wq_b, int64_t num_heads) {
  std::vector<c10::SymInt> shape(q_latent.sym_sizes().begin(), q_latent.sym_sizes().end() - 1);
  shape.emplace_back(num_heads);
  shape.push_back(wq_b.sym_size(0) / num_heads);
  return at::matmul(q_latent, wq_b.t()).view_symint(shape);
}

at::Tensor rotate_q(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin, bool interleave) {
  return rotate_rope_part(q, cos, sin, interleave, /*transposed=*/false);
}

void check_q_latent_inputs(
    const at::Tensor& q_latent,
    const at::Tensor& wq_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    const at::Tensor& k_rope,
    int64_t num_heads,
    const std::optional<at::Tensor>& cu_seqlens,
    const char* op,
    const char* q_latent_name) {
  TORCH_CHECK_VALUE(q_latent.defined() && wq_b.defined() && cos.defined() && sin.defined() &&
                        k_rope.defined(),
                    op, q_latent_name, ", wq_b, cos, sin and k_rope must be defined tensors");
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  const int64_t rank = varlen ? 2 : 3;
  const char* shape = varlen ? "(T, Lq) (packed, cu_seqlens given)" : "(B, S, Lq) (padded batch)";
  TORCH_CHECK_VALUE(q_latent.dim() == rank, op, q_latent_name, " must have shape ", shape, ", got shape ",
                    q_latent.sym_sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(q_latent.scalar_type()), op, q_latent_name,
                    " must be a floating-point tensor, got ", q_latent.scalar_type());
  TORCH_CHECK_VALUE(wq_b.scalar_type() == q_latent.scalar_type() && wq_b.device() == q_latent.device(),
                    op, "wq_b must have ", q_latent_name, "'s dtype and device (", q_latent.scalar_type(), ", ",
                    q_latent.device(), "), got ", wq_b.scalar_type(), ", ", wq_b.device());
  TORCH_CHECK_VALUE(num_heads >= 1, op, "num_heads must be at least 1, got ", num_heads);
  TORCH_CHECK_VALUE(
      wq_b.dim() == 2 && wq_b.sym_size(1) == q_latent.sym_size(-1) && wq_b.sym_size(0) % num_heads == 0,
      op, "wq_b must have shape (H*(Dn+Dr), Lq) with H = ", num_heads, " and Lq = ",
      q_latent.sym_size(-1), " (", q_latent_name, "'s last dimension), got shape ", wq_b.sym_sizes());
  const c10::SymInt dim_rope = k_rope.sym_size(-1);
  TORCH_CHECK_VALUE(dim_rope % 2 == 0, op, "k_rope's last dimension Dr must be even (RoPE rotates pairs), got ",
                    dim_rope);
  TORCH_CHECK_VALUE(wq_b.sym_size(0) / num_heads > dim_rope, op, "wq_b's rows per head (Dn+Dr = ",
                    wq_b.sym_size(0) / num_heads, ") must exceed k_rope's last dimension Dr (", dim_rope, ")");
  for (const auto& [t, arg] : {std::pair<const at::Tensor&, const char*>{cos, "cos"},
                               std::pair<const at::Tensor&, const char*>{sin, "sin"}}) {
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()) && t.scalar_type() == cos.scalar_type(), op,
                      arg, " must be floating point, cos and sin of one dtype, got ", cos.scalar_type(),
                      " and ", sin.scalar_type());
    TORCH_CHECK_VALUE(t.device() == q_latent.device(), op, arg, " must be on ", q_latent_name, "'s device (",
                      q_latent.device(), "), got ", t.device());
    bool ok = t.dim() == rank && t.sym_size(-1) == dim_rope / 2;
    for (int64_t i = 0; ok && i < rank - 1; ++i) ok = t.sym_size(i) == q_latent.sym_size(i);
    TORCH_CHECK_VALUE(ok, op, arg, " must have shape ", varlen ? "(T, Dr/2)" : "(B, S, Dr/2)",
                      " matching ", q_latent_name, " ", q_latent.sym_sizes(), " and Dr = ", dim_rope,
                      ", got shape ", t.sym_sizes());
  }
}

RotateQGrads rotate_q_backward(
    const at::Tensor& grad_q,
    const at::Tensor& q,
    const at::Tensor& cos,
    const at::Tensor& sin,
    bool rope_interleave,
    bool need_q,
    bool need_rope) {
  RotateQGrads grads;
  if (need_rope) {
    const c10::SymInt dim_rope = cos.sym_size(-1) * 2;
    const auto rope = [&](const at::Tensor& t) {
      return t.narrow_symint(-1, t.sym_size(-1) - dim_rope, dim_rope).to(at::toOpMathType(t.scalar_type()));
    };
    const auto [x1, x2] = split_pairs(rope(q), rope_interleave);
    const auto [g1, g2] = split_pairs(rope(grad_q), rope_interleave);
    grads.cos = (g1 * x1 + g2 * x2).sum(-2).to(cos.scalar_type());
    grads.sin = (g2 * x1 - g1 * x2).sum(-2).to(sin.scalar_type());
  }
  if (need_q) grads.q = rotate_rope_part(grad_q, cos, sin, rope_interleave, /*transposed=*/true);
  return grads;
}

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
    bool need_rope) {
  RotateQGrads rotated = rotate_q_backward(grad_q, q_projected, cos, sin, rope_interleave,
                                           need_q_latent || need_wq_b, need_rope);
  ExpandQGrads grads{at::Tensor(), at::Tensor(), rotated.cos, rotated.sin};
  if (rotated.q.defined()) {
    const at::Tensor g = rotated.q.flatten(-2);  // (…, H·(Dn+Dr)), wq_b's row layout
    if (need_q_latent) grads.q_latent = at::matmul(g, wq_b);
    if (need_wq_b) {
      grads.wq_b = at::mm(g.reshape_symint({-1, g.sym_size(-1)}).t(),
                          q_latent.reshape_symint({-1, q_latent.sym_size(-1)}));
    }
  }
  return grads;
}

}  // namespace torch_mla
