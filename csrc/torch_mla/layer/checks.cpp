#include "torch_mla/layer/checks.h"

#include <c10/util/Exception.h>

#include <vector>

namespace torch_mla {
namespace {

// The expected shape of an argument, for messages: e.g. "(B, S, H, Dn+Dr)".
const char* layout(const char* arg, bool varlen) {
  struct Entry { const char* arg; const char* padded; const char* packed; };
  static const Entry entries[] = {
      {"q", "(B, S, H, Dn+Dr)", "(T, H, Dn+Dr)"},
      {"kv_latent", "(B, S, Dc)", "(T, Dc)"},
      {"k_rope", "(B, S, Dr)", "(T, Dr)"},
      {"grad_out", "(B, S, H, Dv)", "(T, H, Dv)"},
      {"out", "(B, S, H, Dv)", "(T, H, Dv)"},
      {"lse", "(B, S, H)", "(T, H)"},
  };
  for (const auto& e : entries) {
    if (std::string(e.arg) == arg) return varlen ? e.packed : e.padded;
  }
  return "?";
}

void check_rank(const at::Tensor& t, const char* arg, int64_t rank, bool varlen) {
  TORCH_CHECK_VALUE(
      t.dim() == rank, "torch_mla.mla_attention: ", arg, " must have shape ", layout(arg, varlen),
      varlen ? " (packed, cu_seqlens given)" : " (padded batch)", ", got a ", t.dim(),
      "-D tensor of shape ", t.sym_sizes());
}

void check_like_q(const at::Tensor& t, const char* arg, const at::Tensor& q) {
  TORCH_CHECK_VALUE(
      t.scalar_type() == q.scalar_type(), "torch_mla.mla_attention: ", arg,
      " must have the same dtype as q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(
      t.device() == q.device(), "torch_mla.mla_attention: ", arg,
      " must be on the same device as q (", q.device(), "), got ", t.device());
}

void check_inner_contiguous(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(
      t.sym_size(-1) <= 1 || t.sym_stride(-1) == 1, "torch_mla.mla_attention: ", arg,
      " must be contiguous in its last dimension (stride 1), got strides ", t.sym_strides());
}

void check_size(const at::Tensor& t, const char* arg, int64_t d, const c10::SymInt& expected,
                const char* what, bool varlen) {
  TORCH_CHECK_VALUE(
      t.sym_size(d) == expected, "torch_mla.mla_attention: ", arg, " must have shape ",
      layout(arg, varlen), " with ", what, " = ", expected, ", got shape ", t.sym_sizes());
}

}  // namespace

at::ScalarType lse_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

MlaDims check_mla_inputs(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK_VALUE(q.defined() && kv_latent.defined() && k_rope.defined() && wkv_b.defined(),
                    "torch_mla.mla_attention: q, kv_latent, k_rope and wkv_b must be defined tensors");
  const auto dtype = q.scalar_type();
  TORCH_CHECK_VALUE(
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
      "torch_mla.mla_attention: q must be float64, float32, bfloat16 or float16, got ", dtype);
  check_like_q(kv_latent, "kv_latent", q);
  check_like_q(k_rope, "k_rope", q);
  check_like_q(wkv_b, "wkv_b", q);

  MlaDims d;
  d.varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  check_rank(q, "q", d.varlen ? 3 : 4, d.varlen);
  check_rank(kv_latent, "kv_latent", d.varlen ? 2 : 3, d.varlen);
  check_rank(k_rope, "k_rope", d.varlen ? 2 : 3, d.varlen);
  TORCH_CHECK_VALUE(wkv_b.dim() == 2,
                    "torch_mla.mla_attention: wkv_b must have shape (H*(Dn+Dv), Dc), got a ",
                    wkv_b.dim(), "-D tensor of shape ", wkv_b.sym_sizes());

  if (d.varlen) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt,
                      "torch_mla.mla_attention: cu_seqlens must be int32, got ", cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.sym_size(0) >= 1,
                      "torch_mla.mla_attention: cu_seqlens must be a 1-D tensor of shape (B+1,), got shape ",
                      cu.sym_sizes());
    TORCH_CHECK_VALUE(cu.device() == q.device(),
                      "torch_mla.mla_attention: cu_seqlens must be on the same device as q (",
                      q.device(), "), got ", cu.device());
    d.batch = cu.sym_size(0) - 1;
    d.tokens = q.sym_size(0);
    d.seqlen = 0;
    check_size(kv_latent, "kv_latent", 0, d.tokens, "T (from q)", true);
    check_size(k_rope, "k_rope", 0, d.tokens, "T (from q)", true);
  } else {
    d.batch = q.sym_size(0);
    d.seqlen = q.sym_size(1);
    d.tokens = d.batch * d.seqlen;
    check_size(kv_latent, "kv_latent", 0, d.batch, "B (from q)", false);
    check_size(k_rope, "k_rope", 0, d.batch, "B (from q)", false);
    check_size(kv_latent, "kv_latent", 1, d.seqlen, "S (from q)", false);
    check_size(k_rope, "k_rope", 1, d.seqlen, "S (from q)", false);
  }

  d.heads = q.sym_size(-2);
  d.dim_rope = k_rope.sym_size(-1);
  d.dim_latent = kv_latent.sym_size(-1);
  const c10::SymInt dim_qk = q.sym_size(-1);
  TORCH_CHECK_VALUE(d.heads >= 1, "torch_mla.mla_attention: q must have at least one head, got shape ",
                    q.sym_sizes());
  TORCH_CHECK_VALUE(
      d.dim_rope < dim_qk, "torch_mla.mla_attention: k_rope's last dimension Dr (", d.dim_rope,
      ") must be smaller than q's last dimension Dn+Dr (", dim_qk, ")");
  d.dim_nope = dim_qk - d.dim_rope;
  TORCH_CHECK_VALUE(
      wkv_b.sym_size(1) == d.dim_latent, "torch_mla.mla_attention: wkv_b must have shape (H*(Dn+Dv), Dc) with Dc = ",
      d.dim_latent, " (kv_latent's last dimension), got shape ", wkv_b.sym_sizes());
  TORCH_CHECK_VALUE(
      wkv_b.sym_size(0) % d.heads == 0,
      "torch_mla.mla_attention: wkv_b must have shape (H*(Dn+Dv), Dc) with H = ", d.heads,
      "; its first dimension ", wkv_b.sym_size(0), " is not divisible by H");
  d.dim_v = wkv_b.sym_size(0) / d.heads - d.dim_nope;
  TORCH_CHECK_VALUE(
      d.dim_v >= 1, "torch_mla.mla_attention: wkv_b must have shape (H*(Dn+Dv), Dc) with Dn = ", d.dim_nope,
      " and Dv >= 1, got shape ", wkv_b.sym_sizes(), " (", wkv_b.sym_size(0) / d.heads, " rows per head)");

  check_inner_contiguous(q, "q");
  check_inner_contiguous(kv_latent, "kv_latent");
  check_inner_contiguous(k_rope, "k_rope");
  check_inner_contiguous(wkv_b, "wkv_b");
  return d;
}

MlaDims check_mla_backward_inputs(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens) {
  MlaDims d = check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens);
  const int64_t rank = q.dim();
  for (const auto& [t, arg] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                               std::pair<const at::Tensor&, const char*>{out, "out"}}) {
    TORCH_CHECK_VALUE(t.defined(), "torch_mla.mla_attention_backward: ", arg, " must be defined");
    check_rank(t, arg, rank, d.varlen);
    check_like_q(t, arg, q);
    for (int64_t i = 0; i < rank - 1; ++i) {
      check_size(t, arg, i, q.sym_size(i), "the leading sizes of q", d.varlen);
    }
    check_size(t, arg, rank - 1, d.dim_v, "Dv", d.varlen);
  }
  TORCH_CHECK_VALUE(lse.defined(), "torch_mla.mla_attention_backward: lse must be defined");
  check_rank(lse, "lse", rank - 1, d.varlen);
  for (int64_t i = 0; i < rank - 1; ++i) {
    check_size(lse, "lse", i, q.sym_size(i), "the leading sizes of q", d.varlen);
  }
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_dtype(q.scalar_type()),
                    "torch_mla.mla_attention_backward: lse must be ", lse_dtype(q.scalar_type()),
                    ", got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(),
                    "torch_mla.mla_attention_backward: lse must be on the same device as q");
  return d;
}

int64_t check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t tokens, int64_t max_seqlen) {
  // A host copy (read_on_host, layer/sequences.h): reading is counted there, not here.
  TORCH_INTERNAL_ASSERT(cu_seqlens.is_cpu(), "check_cu_seqlens_values takes a host copy of cu_seqlens");
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* v = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK_VALUE(v[0] == 0, "torch_mla.mla_attention: cu_seqlens must start at 0, got ", v[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(v[i] >= v[i - 1], "torch_mla.mla_attention: cu_seqlens must be non-decreasing, got ",
                      v[i - 1], " then ", v[i], " at index ", i);
    longest = std::max<int64_t>(longest, v[i] - v[i - 1]);
  }
  TORCH_CHECK_VALUE(v[n - 1] == tokens, "torch_mla.mla_attention: cu_seqlens must end at T = ", tokens,
                    " (q.size(0)), got ", v[n - 1]);
  TORCH_CHECK_VALUE(max_seqlen <= 0 || longest <= max_seqlen,
                    "torch_mla.mla_attention: max_seqlen (", max_seqlen,
                    ") is smaller than the longest sequence in cu_seqlens (", longest, ")");
  return longest;
}

std::string renamed_message(const std::string& message, const char* op) {
  // Also the checks of mla_sparse_attention and dsa_indexer_topk, which dsa_indexer_loss reuses.
  for (const char* inner : {"torch_mla.mla_attention_backward: ", "torch_mla.mla_attention: ",
                            "torch_mla.mla_sparse_attention: ", "torch_mla.dsa_indexer_topk: "}) {
    const std::string prefix(inner);
    if (message.rfind(prefix, 0) == 0) return op + message.substr(prefix.size());
  }
  return message;
}

}  // namespace torch_mla
