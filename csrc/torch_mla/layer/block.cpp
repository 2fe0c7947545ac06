// The latent-only block's math (layer/block.h, docs/design.md §13).
#include "torch_mla/layer/block.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/q_expand.h"
#include "torch_mla/layer/rms_norm.h"
#include "torch_mla/layer/sparse_checks.h"
#include "torch_mla/ops/mla_attention.h"
#include "torch_mla/ops/mla_sparse_attention.h"

namespace torch_mla {
namespace {

constexpr const char* kOp = "torch_mla.mla_attention_block: ";

bool is_given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Heads [first, first + count) of one group, and that group's weights: rows of wq_b and wkv_b,
// columns of wo (views, no copies).
struct HeadChunk {
  int64_t first, count;
  at::Tensor wq_b, wkv_b, wo;
};

// The groups of a call: ceil(H / head_chunks) heads each, so at most head_chunks groups, the last
// one smaller when they do not divide.
std::vector<HeadChunk> head_chunks_of(const BlockArgs& a, const BlockDims& dims) {
  const int64_t per_chunk = (a.num_heads + a.head_chunks - 1) / a.head_chunks;
  const c10::SymInt q_width = dims.nope + dims.rope, kv_width = dims.nope + dims.v;
  std::vector<HeadChunk> chunks;
  for (int64_t first = 0; first < a.num_heads; first += per_chunk) {
    const int64_t count = std::min(per_chunk, a.num_heads - first);
    chunks.push_back({first, count, a.wq_b.narrow_symint(0, q_width * first, q_width * count),
                      a.wkv_b.narrow_symint(0, kv_width * first, kv_width * count),
                      a.wo.narrow_symint(1, dims.v * first, dims.v * count)});
  }
  return chunks;
}

// What the block computes before the attention for every head, from its inputs and the norms' rstd.
struct BlockLatents {
  at::Tensor c_q, kv_latent, k_rope_raw, k_rope;
};

// The latents of the block: the norms applied with the given rstd (q_rstd undefined without
// q_norm_weight), k_rope rotated; q is expanded per head group (chunk_q).
BlockLatents block_latents(const BlockArgs& a, const at::Tensor& q_rstd, const at::Tensor& kv_rstd) {
  const c10::SymInt dim_latent = a.wkv_b.sym_size(1), dim_rope = a.kv_a.sym_size(-1) - dim_latent;
  BlockLatents l;
  l.c_q = is_given(a.q_norm_weight) ? rms_norm_apply(a.q_a, *a.q_norm_weight, q_rstd).to(a.wq_b.scalar_type())
                                    : a.q_a;
  l.kv_latent = rms_norm_apply(a.kv_a.narrow_symint(-1, 0, dim_latent), a.kv_norm_weight, kv_rstd)
                    .to(a.wkv_b.scalar_type());
  l.k_rope_raw = a.kv_a.narrow_symint(-1, dim_latent, dim_rope);
  // k_rope as one head of q: the same rotation, written once (layer/q_expand.h).
  l.k_rope = rotate_q(l.k_rope_raw.unsqueeze(-2), a.cos, a.sin, a.rope_interleave).squeeze(-2);
  return l;
}

// One head group's q, (…, count, Dn+Dr): `projected` = c_q · wq_bᵀ for the group's rows (what the
// cos/sin grads read), `q` the same with q_rope rotated.
struct ChunkQ {
  at::Tensor projected, q;
};

ChunkQ chunk_q(const BlockArgs& a, const at::Tensor& c_q, const HeadChunk& chunk) {
  ChunkQ q;
  q.projected = project_q(c_q, chunk.wq_b, chunk.count);
  q.q = rotate_q(q.projected, a.cos, a.sin, a.rope_interleave);
  return q;
}

// One head group's attention, (out, lse): mla_attention, or mla_sparse_attention on the call's
// topk_indices (§13.7); errors name the block.
std::tuple<at::Tensor, at::Tensor> chunk_attention(const BlockArgs& a, const at::Tensor& q, const BlockLatents& l,
                                                   const HeadChunk& chunk) {
  return naming_errors_as(kOp, [&] {
    auto [out, lse, ignored] =
        is_given(a.topk_indices)
            ? mla_sparse_attention(q, l.kv_latent, l.k_rope, chunk.wkv_b, *a.topk_indices, a.softmax_scale,
                                   a.cu_seqlens, a.max_seqlen, a.core)
            : mla_attention(q, l.kv_latent, l.k_rope, chunk.wkv_b, a.softmax_scale, a.causal, a.cu_seqlens,
                            a.max_seqlen, a.core);
    return std::make_tuple(std::move(out), std::move(lse));
  });
}

// The backward of chunk_attention: (grad_q, grad_kv_latent, grad_k_rope, grad_wkv_b) of the group.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_attention_backward(
    const BlockArgs& a, const at::Tensor& grad_out, const at::Tensor& q, const BlockLatents& l,
    const HeadChunk& chunk, const at::Tensor& out, const at::Tensor& lse) {
  return naming_errors_as(kOp, [&] {
    return is_given(a.topk_indices)
               ? mla_sparse_attention_backward(grad_out, q, l.kv_latent, l.k_rope, chunk.wkv_b, *a.topk_indices,
                                               out, lse, a.softmax_scale, a.cu_seqlens, a.max_seqlen, a.core)
               : mla_attention_backward(grad_out, q, l.kv_latent, l.k_rope, chunk.wkv_b, out, lse, a.softmax_scale,
                                        a.causal, a.cu_seqlens, a.max_seqlen, a.core);
  });
}

// sum += part (sum taken over when undefined; an undefined part adds nothing).
void accumulate(at::Tensor& sum, at::Tensor part) {
  if (!part.defined()) return;
  if (sum.defined()) {
    sum.add_(part);
  } else {
    sum = std::move(part);
  }
}

// A weight's grad from its head groups' slices (along `dim`, from `start`): the slice itself when
// it is the whole weight, else copied into one buffer of the weight's size (not a list of slices
// joined at the end, which would hold the weight's size twice).
void place(at::Tensor& grad, at::Tensor part, const at::Tensor& weight, int64_t dim, const c10::SymInt& start) {
  if (!part.defined()) return;
  if (part.sym_size(dim) == weight.sym_size(dim)) {
    grad = std::move(part);
    return;
  }
  if (!grad.defined()) grad = at::empty_like(weight, at::MemoryFormat::Contiguous);
  grad.narrow_symint(dim, start, part.sym_size(dim)).copy_(part);
}

}  // namespace

BlockDims block_dims(const BlockArgs& a) {
  const c10::SymInt rope = a.kv_a.sym_size(-1) - a.wkv_b.sym_size(1);
  const c10::SymInt nope = a.wq_b.sym_size(0) / a.num_heads - rope;
  return {nope, rope, a.wkv_b.sym_size(0) / a.num_heads - nope};
}

void check_block_inputs(const BlockArgs& a) {
  const auto& [q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads, softmax_scale,
               q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens, max_seqlen, core, head_chunks,
               topk_indices] = a;
  TORCH_CHECK_VALUE(head_chunks >= 1, kOp, "head_chunks must be >= 1 (the number of head groups), got ", head_chunks);
  TORCH_CHECK_VALUE(q_a.defined() && wq_b.defined() && kv_a.defined() && kv_norm_weight.defined() &&
                        wkv_b.defined() && wo.defined() && cos.defined() && sin.defined(),
                    kOp, "q_a, wq_b, kv_a, kv_norm_weight, wkv_b, wo, cos and sin must be defined tensors");
  const bool varlen = is_given(cu_seqlens);
  const int64_t rank = varlen ? 2 : 3;
  const char* layout = varlen ? " (packed, cu_seqlens given)" : " (padded batch)";
  TORCH_CHECK_VALUE(q_a.dim() == rank && at::isFloatingType(q_a.scalar_type()), kOp,
                    "q_a must be a floating-point tensor of shape ", varlen ? "(T, Lq)" : "(B, S, Lq)",
                    layout, ", got ", q_a.scalar_type(), " of shape ", q_a.sym_sizes());
  for (const auto& [t, arg] : {std::pair<const at::Tensor&, const char*>{kv_a, "kv_a"},
                               std::pair<const at::Tensor&, const char*>{wkv_b, "wkv_b"},
                               std::pair<const at::Tensor&, const char*>{wo, "wo"}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == q_a.scalar_type() && t.device() == q_a.device(), kOp, arg,
                      " must have q_a's dtype and device (", q_a.scalar_type(), ", ", q_a.device(), "), got ",
                      t.scalar_type(), ", ", t.device());
  }
  TORCH_CHECK_VALUE(wkv_b.dim() == 2, kOp, "wkv_b must have shape (H*(Dn+Dv), Dc), got shape ", wkv_b.sym_sizes());
  const c10::SymInt dim_latent = wkv_b.sym_size(1);
  bool kv_ok = kv_a.dim() == rank && kv_a.sym_size(-1) >= dim_latent;  // Dr = 0: NoPE MLA
  for (int64_t i = 0; kv_ok && i < rank - 1; ++i) kv_ok = kv_a.sym_size(i) == q_a.sym_size(i);
  TORCH_CHECK_VALUE(kv_ok, kOp, "kv_a must have shape ", varlen ? "(T, Dc+Dr)" : "(B, S, Dc+Dr)",
                    " matching q_a ", q_a.sym_sizes(), " with Dc = ", dim_latent,
                    " (wkv_b's last dimension) and Dr >= 0, got shape ", kv_a.sym_sizes());
  const c10::SymInt dim_rope = kv_a.sym_size(-1) - dim_latent;
  check_q_latent_inputs(q_a, wq_b, cos, sin, kv_a.narrow_symint(-1, dim_latent, dim_rope), num_heads,
                        cu_seqlens, kOp, "q_a");
  if (is_given(q_norm_weight)) check_rms_norm_inputs(q_a, *q_norm_weight, kOp, "q_a", "q_norm_weight");
  check_rms_norm_inputs(kv_a.narrow_symint(-1, 0, dim_latent), kv_norm_weight, kOp, "kv_a[..., :Dc]",
                        "kv_norm_weight");
  if (is_given(topk_indices)) {
    TORCH_CHECK_VALUE(causal, kOp, "causal must be True with topk_indices (sparse attention is causal only)");
    check_topk_layout(q_a, "q_a", *topk_indices, varlen, kOp);
  }
  const BlockDims d = block_dims(a);
  TORCH_CHECK_VALUE(wkv_b.sym_size(0) % num_heads == 0 && d.v >= 1, kOp,
                    "wkv_b must have shape (H*(Dn+Dv), Dc) with H = ", num_heads, ", Dn = ", d.nope,
                    " (from wq_b) and Dv >= 1, got shape ", wkv_b.sym_sizes());
  TORCH_CHECK_VALUE(wo.dim() == 2 && wo.sym_size(1) == d.v * num_heads, kOp,
                    "wo must have shape (hidden, H*Dv) with H*Dv = ", d.v * num_heads, ", got shape ",
                    wo.sym_sizes());
  if (is_given(bo)) {
    TORCH_CHECK_VALUE(bo->dim() == 1 && bo->sym_size(0) == wo.sym_size(0) &&
                          bo->scalar_type() == q_a.scalar_type() && bo->device() == q_a.device(),
                      kOp, "bo must have shape (hidden,) with hidden = ", wo.sym_size(0), " (wo's rows) and q_a's dtype "
                      "and device, got ", bo->scalar_type(), " of shape ", bo->sym_sizes(), " on ", bo->device());
  }
}

BlockForward block_forward(const BlockArgs& a) {
  BlockForward f;
  const at::Tensor kv_a_latent = a.kv_a.narrow_symint(-1, 0, a.wkv_b.sym_size(1));
  f.q_rstd = is_given(a.q_norm_weight)
                 ? rms_norm_rstd(a.q_a, a.q_norm_eps)
                 : at::empty({0}, a.q_a.options().dtype(at::toOpMathType(a.q_a.scalar_type())));
  f.kv_rstd = rms_norm_rstd(kv_a_latent, a.kv_norm_eps);
  const BlockLatents l = block_latents(a, f.q_rstd, f.kv_rstd);
  // y = Σ over head groups of out_g · wo_gᵀ: one group's q and out at a time (docs/design.md
  // §13.6), the sum accumulated in y by GEMMs with beta = 1.
  for (const HeadChunk& chunk : head_chunks_of(a, block_dims(a))) {
    const at::Tensor out = std::get<0>(chunk_attention(a, chunk_q(a, l.c_q, chunk).q, l, chunk));
    const at::Tensor out_rows = out.flatten(-2);
    if (!f.y.defined()) {
      f.y = at::linear(out_rows, chunk.wo, a.bo);
    } else {
      f.y.view_symint({-1, f.y.sym_size(-1)}).addmm_(out_rows.reshape_symint({-1, out_rows.sym_size(-1)}),
                                                     chunk.wo.t());
    }
  }
  return f;
}

std::array<at::Tensor, kNumBlockTensors> block_backward(const BlockArgs& a, const at::Tensor& q_rstd,
                                                        const at::Tensor& kv_rstd, at::Tensor grad_y_in,
                                                        const std::array<bool, kNumBlockTensors>& needs) {
  std::array<at::Tensor, kNumBlockTensors> grads;
  const auto need = [&](BlockInput i) { return needs[i]; };
  const auto& [q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads, softmax_scale,
               q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens, max_seqlen, core, head_chunks,
               topk_indices] = a;
  const bool need_rope = need(kCos) || need(kSin);
  BlockLatents l = block_latents(a, q_rstd, kv_rstd);
  const bool need_c_q = need(kQA) || need(kQNorm);
  const at::Tensor grad_y = std::move(grad_y_in);
  const at::Tensor grad_y_rows = grad_y.reshape_symint({-1, grad_y.sym_size(-1)});
  if (need(kBo)) grads[kBo] = grad_y_rows.sum(0);
  // One head group at a time (docs/design.md §13.6): its q, out and the attention's transients
  // are recomputed, used and released before the next group's; the latent-side grads are summed
  // over the groups, the weights' grads are the groups' row (column, for wo) slices.
  at::Tensor grad_c_q, grad_kv_latent, grad_k_rope, grad_cos, grad_sin;
  const BlockDims d = block_dims(a);
  for (const HeadChunk& chunk : head_chunks_of(a, d)) {
    ChunkQ q = chunk_q(a, l.c_q, chunk);
    if (!need_rope) q.projected = at::Tensor();
    auto [out, lse] = chunk_attention(a, q.q, l, chunk);
    // o_proj over the group's heads: y = out·woᵀ + bo, so dwo = dyᵀ·out and dout = dy·wo.
    if (need(kWo)) {
      place(grads[kWo], at::mm(grad_y_rows.t(), out.flatten(-2).reshape_symint({-1, chunk.wo.sym_size(1)})), wo, 1,
            d.v * chunk.first);
    }
    at::Tensor grad_out = at::matmul(grad_y, chunk.wo).view_symint(out.sym_sizes());
    auto [grad_q, grad_latent, grad_rope, grad_w] = chunk_attention_backward(a, grad_out, q.q, l, chunk, out, lse);
    out = lse = grad_out = q.q = at::Tensor();
    place(grads[kWkvB], std::move(grad_w), wkv_b, 0, (d.nope + d.v) * chunk.first);
    accumulate(grad_kv_latent, std::move(grad_latent));
    accumulate(grad_k_rope, std::move(grad_rope));
    ExpandQGrads gq = expand_q_backward(grad_q, q.projected, l.c_q, chunk.wq_b, cos, sin, rope_interleave, need_c_q,
                                        need(kWqB), need_rope);
    place(grads[kWqB], std::move(gq.wq_b), wq_b, 0, (d.nope + d.rope) * chunk.first);
    accumulate(grad_c_q, std::move(gq.q_latent));
    accumulate(grad_cos, std::move(gq.cos));
    accumulate(grad_sin, std::move(gq.sin));
  }
  l.c_q = l.kv_latent = l.k_rope = at::Tensor();

  if (need_c_q && q_norm_weight) {
    RmsNormGrads gn = rms_norm_backward(grad_c_q, q_a, *q_norm_weight, q_rstd, need(kQA), need(kQNorm));
    grads[kQA] = gn.x;
    grads[kQNorm] = gn.weight;
  } else {
    grads[kQA] = grad_c_q;
  }

  RotateQGrads gk = rotate_q_backward(grad_k_rope.unsqueeze(-2), l.k_rope_raw.unsqueeze(-2), cos, sin,
                                      rope_interleave, need(kKvA), need_rope);
  if (need(kKvA) || need(kKvNorm)) {
    RmsNormGrads gn = rms_norm_backward(grad_kv_latent, kv_a.narrow_symint(-1, 0, wkv_b.sym_size(1)),
                                        kv_norm_weight, kv_rstd, need(kKvA), need(kKvNorm));
    if (need(kKvA)) grads[kKvA] = at::cat({gn.x, gk.q.squeeze(-2)}, -1);
    grads[kKvNorm] = gn.weight;
  }
  if (need_rope) {
    grads[kCos] = grad_cos.add(gk.cos);
    grads[kSin] = grad_sin.add(gk.sin);
  }
  return grads;
}

}  // namespace torch_mla
