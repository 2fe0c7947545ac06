// The latent-only attention block op (docs/design.md §13): schema, dispatcher entry, its checks and
// forward math, and the forward for every backend (CompositeExplicitAutograd: the norms, the q
// expansion and o_proj in ATen around mla_attention, so CPU, CUDA and Meta/fake tensors run the
// same code; the autograd Function calls the same block_forward).
#include "torch_mla/mla_attention_block.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "torch_mla/mla_attention.h"
#include "torch_mla/q_expand.h"
#include "torch_mla/rms_norm.h"

namespace torch_mla {

namespace {

constexpr const char* kOp = "torch_mla.mla_attention_block: ";

bool is_given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

BlockDims block_dims(const at::Tensor& wq_b, const at::Tensor& kv_a, const at::Tensor& wkv_b, int64_t num_heads) {
  const c10::SymInt rope = kv_a.sym_size(-1) - wkv_b.sym_size(1);
  const c10::SymInt nope = wq_b.sym_size(0) / num_heads - rope;
  return {nope, rope, wkv_b.sym_size(0) / num_heads - nope};
}

void check_block_inputs(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    const std::optional<at::Tensor>& cu_seqlens,
    int64_t head_chunks) {
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
  bool kv_ok = kv_a.dim() == rank && kv_a.sym_size(-1) > dim_latent;
  for (int64_t i = 0; kv_ok && i < rank - 1; ++i) kv_ok = kv_a.sym_size(i) == q_a.sym_size(i);
  TORCH_CHECK_VALUE(kv_ok, kOp, "kv_a must have shape ", varlen ? "(T, Dc+Dr)" : "(B, S, Dc+Dr)",
                    " matching q_a ", q_a.sym_sizes(), " with Dc = ", dim_latent,
                    " (wkv_b's last dimension) and Dr >= 1, got shape ", kv_a.sym_sizes());
  const c10::SymInt dim_rope = kv_a.sym_size(-1) - dim_latent;
  check_q_latent_inputs(q_a, wq_b, cos, sin, kv_a.narrow_symint(-1, dim_latent, dim_rope), num_heads,
                        cu_seqlens, kOp, "q_a");
  if (is_given(q_norm_weight)) check_rms_norm_inputs(q_a, *q_norm_weight, kOp, "q_a", "q_norm_weight");
  check_rms_norm_inputs(kv_a.narrow_symint(-1, 0, dim_latent), kv_norm_weight, kOp, "kv_a[..., :Dc]",
                        "kv_norm_weight");
  const BlockDims d = block_dims(wq_b, kv_a, wkv_b, num_heads);
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

BlockLatents block_latents(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& q_rstd,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& kv_rstd,
    const at::Tensor& wkv_b,
    const at::Tensor& cos,
    const at::Tensor& sin,
    bool rope_interleave) {
  const c10::SymInt dim_latent = wkv_b.sym_size(1), dim_rope = kv_a.sym_size(-1) - dim_latent;
  BlockLatents l;
  l.c_q = is_given(q_norm_weight) ? rms_norm_apply(q_a, *q_norm_weight, q_rstd).to(wq_b.scalar_type()) : q_a;
  l.kv_latent = rms_norm_apply(kv_a.narrow_symint(-1, 0, dim_latent), kv_norm_weight, kv_rstd)
                    .to(wkv_b.scalar_type());
  l.k_rope_raw = kv_a.narrow_symint(-1, dim_latent, dim_rope);
  // k_rope as one head of q: the same rotation, written once (q_expand.h).
  l.k_rope = rotate_q(l.k_rope_raw.unsqueeze(-2), cos, sin, rope_interleave).squeeze(-2);
  return l;
}

ChunkQ chunk_q(const at::Tensor& c_q, const HeadChunk& chunk, const at::Tensor& cos, const at::Tensor& sin,
               bool rope_interleave) {
  ChunkQ q;
  q.projected = project_q(c_q, chunk.wq_b, chunk.count);
  q.q = rotate_q(q.projected, cos, sin, rope_interleave);
  return q;
}

std::vector<HeadChunk> head_chunks_of(const at::Tensor& wq_b, const at::Tensor& wkv_b, const at::Tensor& wo,
                                      const BlockDims& dims, int64_t num_heads, int64_t head_chunks) {
  const int64_t per_chunk = (num_heads + head_chunks - 1) / head_chunks;
  const c10::SymInt q_width = dims.nope + dims.rope, kv_width = dims.nope + dims.v;
  std::vector<HeadChunk> chunks;
  for (int64_t first = 0; first < num_heads; first += per_chunk) {
    const int64_t count = std::min(per_chunk, num_heads - first);
    chunks.push_back({first, count, wq_b.narrow_symint(0, q_width * first, q_width * count),
                      wkv_b.narrow_symint(0, kv_width * first, kv_width * count),
                      wo.narrow_symint(1, dims.v * first, dims.v * count)});
  }
  return chunks;
}

BlockForward block_forward(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view backend,
    int64_t head_chunks) {
  BlockForward f;
  const at::Tensor kv_a_latent = kv_a.narrow_symint(-1, 0, wkv_b.sym_size(1));
  f.q_rstd = is_given(q_norm_weight) ? rms_norm_rstd(q_a, q_norm_eps)
                                     : at::empty({0}, q_a.options().dtype(at::toOpMathType(q_a.scalar_type())));
  f.kv_rstd = rms_norm_rstd(kv_a_latent, kv_norm_eps);
  const BlockLatents l = block_latents(q_a, q_norm_weight, f.q_rstd, wq_b, kv_a, kv_norm_weight, f.kv_rstd, wkv_b,
                                       cos, sin, rope_interleave);
  const BlockDims d = block_dims(wq_b, kv_a, wkv_b, num_heads);
  // y = Σ over head groups of out_g · wo_gᵀ: one group's q and out at a time (docs/design.md
  // §13.6), the sum accumulated in y by GEMMs with beta = 1.
  for (const HeadChunk& chunk : head_chunks_of(wq_b, wkv_b, wo, d, num_heads, head_chunks)) {
    const at::Tensor out = std::get<0>(mla_attention(chunk_q(l.c_q, chunk, cos, sin, rope_interleave).q, l.kv_latent,
                                                     l.k_rope, chunk.wkv_b, softmax_scale, causal, cu_seqlens,
                                                     max_seqlen, backend));
    const at::Tensor out_rows = out.flatten(-2);
    if (!f.y.defined()) {
      f.y = at::linear(out_rows, chunk.wo, bo);
    } else {
      f.y.view_symint({-1, f.y.sym_size(-1)}).addmm_(out_rows.reshape_symint({-1, out_rows.sym_size(-1)}),
                                                     chunk.wo.t());
    }
  }
  return f;
}

namespace {

at::Tensor mla_attention_block_composite(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view backend,
    int64_t head_chunks) {
  check_block_inputs(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                     cu_seqlens, head_chunks);
  return block_forward(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                       softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens,
                       std::move(max_seqlen), backend, head_chunks)
      .y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_block_with_rstd_composite(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view backend,
    int64_t head_chunks) {
  check_block_inputs(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                     cu_seqlens, head_chunks);
  BlockForward f = block_forward(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin,
                                 num_heads, softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave,
                                 cu_seqlens, std::move(max_seqlen), backend, head_chunks);
  return {f.y, f.q_rstd, f.kv_rstd};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  static const std::string schema =
      "mla_attention_block(Tensor q_a, Tensor? q_norm_weight, Tensor wq_b, Tensor kv_a, "
      "Tensor kv_norm_weight, Tensor wkv_b, Tensor wo, Tensor? bo, Tensor cos, Tensor sin, int num_heads, "
      "float softmax_scale, float q_norm_eps, float kv_norm_eps, bool causal, bool rope_interleave, "
      "Tensor? cu_seqlens, SymInt max_seqlen, str backend=\"auto\", int head_chunks=" +
      std::to_string(kDefaultHeadChunks) + ") -> Tensor";
  m.def(schema.c_str(), {at::Tag::pt2_compliant_tag});
  m.def(
      "_mla_attention_block_with_rstd(Tensor q_a, Tensor? q_norm_weight, Tensor wq_b, Tensor kv_a, "
      "Tensor kv_norm_weight, Tensor wkv_b, Tensor wo, Tensor? bo, Tensor cos, Tensor sin, int num_heads, "
      "float softmax_scale, float q_norm_eps, float kv_norm_eps, bool causal, bool rope_interleave, "
      "Tensor? cu_seqlens, SymInt max_seqlen, str backend, int head_chunks) -> (Tensor y, Tensor q_rstd, Tensor kv_rstd)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(torch_mla, CompositeExplicitAutograd, m) {
  m.impl("mla_attention_block", TORCH_FN(mla_attention_block_composite));
  m.impl("_mla_attention_block_with_rstd", TORCH_FN(mla_attention_block_with_rstd_composite));
}

at::Tensor mla_attention_block(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view backend,
    int64_t head_chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::mla_attention_block", "")
                       .typed<decltype(mla_attention_block)>();
  return op.call(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                 softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens,
                 std::move(max_seqlen), backend, head_chunks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_block_with_rstd(
    const at::Tensor& q_a,
    const std::optional<at::Tensor>& q_norm_weight,
    const at::Tensor& wq_b,
    const at::Tensor& kv_a,
    const at::Tensor& kv_norm_weight,
    const at::Tensor& wkv_b,
    const at::Tensor& wo,
    const std::optional<at::Tensor>& bo,
    const at::Tensor& cos,
    const at::Tensor& sin,
    int64_t num_heads,
    double softmax_scale,
    double q_norm_eps,
    double kv_norm_eps,
    bool causal,
    bool rope_interleave,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view backend,
    int64_t head_chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::_mla_attention_block_with_rstd", "")
                       .typed<decltype(mla_attention_block_with_rstd)>();
  return op.call(q_a, q_norm_weight, wq_b, kv_a, kv_norm_weight, wkv_b, wo, bo, cos, sin, num_heads,
                 softmax_scale, q_norm_eps, kv_norm_eps, causal, rope_interleave, cu_seqlens,
                 std::move(max_seqlen), backend, head_chunks);
}

}  // namespace torch_mla
