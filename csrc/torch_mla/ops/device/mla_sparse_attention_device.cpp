// The CPU and CUDA kernels of mla_sparse_attention (docs/design.md §16): the shared checks → the
// sequence list → the index check and the dense shortcut → the key rows of each query → the sparse
// core → output shaping. The cores (cores/sparse_core.h) see per-head q, the latents and rows only.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/layer/sparse_checks.h"
#include "torch_mla/ops/mla_attention.h"

namespace torch_mla {
namespace {

// The sequence list; a CPU call walks the spans on the host to check the indices (§16.3), a CUDA
// call reads cu_seqlens on the host only when max_seqlen is not given, as mla_attention does.
Sequences sequences_for(const at::Tensor& q, const SparseDims& s, const std::optional<at::Tensor>& cu_seqlens,
                        int64_t max_seqlen) {
  return naming_errors_as(kSparseOp, [&] { return make_sequences(s.mla, cu_seqlens, max_seqlen, q.is_cpu()); });
}

// Each query's sequence start and length, (T,) int64 on q's device, computed there (no host read).
std::pair<at::Tensor, at::Tensor> row_starts_and_lengths(const Sequences& seqs, const at::TensorOptions& options) {
  const at::Tensor tokens = at::arange(seqs.tokens, options.dtype(at::kLong));
  if (!seqs.packed) {
    const at::Tensor starts = tokens - tokens.remainder(seqs.padded_len);
    return {starts, at::full_like(starts, seqs.padded_len)};
  }
  const at::Tensor cu = seqs.cu_seqlens.to(at::kLong);
  const at::Tensor sequence = at::searchsorted(cu.narrow(0, 1, seqs.count), tokens, /*out_int32=*/false,
                                               /*right=*/true);
  const at::Tensor starts = cu.index_select(0, sequence);
  return {starts, cu.index_select(0, sequence + 1) - starts};
}

// (T, k) int64 key rows in the packed layout: a position p of query t's own sequence becomes the
// row start + p when 0 ≤ p ≤ t, else −1 (none, or past the query: causal).
at::Tensor key_rows(const at::Tensor& topk_indices, const at::Tensor& starts) {
  const at::Tensor idx = topk_indices.reshape({starts.size(0), -1}).to(at::kLong);
  const at::Tensor tokens = at::arange(starts.size(0), starts.options());
  const at::Tensor selects = idx.ge(0) & idx.le((tokens - starts).unsqueeze(1));
  return at::where(selects, idx + starts.unsqueeze(1), -1);
}

// Checks the entries (§16.3) and returns whether the dense shortcut serves the call: only for
// "auto" on host data whose every row selects its whole causal prefix (§16.5).
bool check_entries(const at::Tensor& topk_indices, const Sequences& seqs, const at::Tensor& lengths,
                   const std::string& core) {
  if (topk_indices.is_cpu()) return dense_shortcut_declines(topk_indices, seqs, core) == nullptr;
  assert_topk_values_on_device(topk_indices, lengths);
  return false;
}

// The sparse core a call runs unless the dense shortcut takes it: the table's rule over the sparse
// forms (cores/table.h) for "auto", else the named core once its limits are checked.
const SparseCore& sparse_core(const at::Tensor& q, const SparseDims& s, const std::string& name) {
  const std::string chosen = choose_core(query_for(q, s.mla.dim_nope, s.mla.dim_rope, s.mla.dim_v, s.mla.varlen),
                                         name, /*sparse=*/true);
  const SparseCore* core = find_sparse_core(chosen);
  TORCH_INTERNAL_ASSERT(core != nullptr, "torch_mla.mla_sparse_attention: core \"", chosen, "\" is not registered");
  return *core;
}

struct Problem {
  SparseProblem p;
  at::Tensor w_k, w_v;
};

Problem make_problem(const SparseDims& s, const at::Tensor& wkv_b, double softmax_scale, bool max_logits) {
  const int64_t H = s.mla.heads.expect_int(), Dn = s.mla.dim_nope.expect_int(), Dv = s.mla.dim_v.expect_int();
  const at::Tensor w = wkv_b.view({H, Dn + Dv, -1});
  return {{H, Dn, s.mla.dim_rope.expect_int(), Dv, s.mla.dim_latent.expect_int(), s.topk.expect_int(), softmax_scale,
           at::globalContext().deterministicAlgorithms(), max_logits},
          w.narrow(1, 0, Dn), w.narrow(1, Dn, Dv)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_device(
    const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope, const at::Tensor& wkv_b,
    const at::Tensor& topk_indices, double softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen, c10::string_view core, bool return_max_logits) {
  const KernelDtypeGuard no_autocast;
  const c10::OptionalDeviceGuard device_guard(q.device());
  const SparseDims s = check_sparse_inputs(q, kv_latent, k_rope, wkv_b, topk_indices, cu_seqlens);
  const std::string name = resolve_sparse_core(std::string(core));
  const SparseCore& sparse = sparse_core(q, s, name);
  const Sequences seqs = sequences_for(q, s, cu_seqlens, max_seqlen);
  const int64_t T = seqs.tokens, H = s.mla.heads.expect_int();
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.mla.dim_v.expect_int();
  const auto lse_shape = q.sizes().slice(0, q.dim() - 1);
  const auto stats = q.options().dtype(lse_dtype(q.scalar_type()));
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor max_logits = return_max_logits ? at::full({H}, -inf, stats) : at::empty({0}, stats);
  if (T == 0) return {at::empty(out_shape, q.options()), at::empty(lse_shape, stats), max_logits};
  const auto [starts, lengths] = row_starts_and_lengths(seqs, q.options());
  if (check_entries(topk_indices, seqs, lengths, name)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return naming_errors_as(kSparseOp, [&] {
      return mla_attention(q, kv_latent, k_rope, wkv_b, softmax_scale, /*causal=*/true, cu_seqlens, max_seqlen,
                           "auto", return_max_logits);
    });
  }
  // k = 0: no query selects anything.
  if (s.topk.expect_int() == 0) {
    return {at::zeros(out_shape, q.options()), at::full(lse_shape, -inf, stats), max_logits};
  }
  const Problem problem = make_problem(s, wkv_b, softmax_scale, return_max_logits);
  SparseOutputs o = sparse.forward(problem.p, q.reshape({T, H, -1}), kv_latent.reshape({T, -1}),
                                              k_rope.reshape({T, -1}), problem.w_k, problem.w_v,
                                              key_rows(topk_indices, starts));
  if (return_max_logits) max_logits = o.max_logits;
  return {o.out.view(out_shape), o.lse.view(lse_shape), max_logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_sparse_attention_backward_device(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
    const at::Tensor& wkv_b, const at::Tensor& topk_indices, const at::Tensor& out, const at::Tensor& lse,
    double softmax_scale, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, c10::string_view core) {
  const KernelDtypeGuard no_autocast;
  const c10::OptionalDeviceGuard device_guard(q.device());
  const SparseDims s =
      check_sparse_backward_inputs(grad_out, q, kv_latent, k_rope, wkv_b, topk_indices, out, lse, cu_seqlens);
  const std::string name = resolve_sparse_core(std::string(core));
  const SparseCore& sparse = sparse_core(q, s, name);
  const Sequences seqs = sequences_for(q, s, cu_seqlens, max_seqlen);
  const int64_t T = seqs.tokens, H = s.mla.heads.expect_int();
  const auto zeros = [](const at::Tensor& t) { return at::zeros_like(t, at::MemoryFormat::Contiguous); };
  if (T == 0 || s.topk.expect_int() == 0) return {zeros(q), zeros(kv_latent), zeros(k_rope), zeros(wkv_b)};
  const auto [starts, lengths] = row_starts_and_lengths(seqs, q.options());
  // The same data gives the forward's decision: the backward runs the path the forward ran.
  if (check_entries(topk_indices, seqs, lengths, name)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return naming_errors_as(kSparseOp, [&] {
      return mla_attention_backward(grad_out, q, kv_latent, k_rope, wkv_b, out, lse, softmax_scale, /*causal=*/true,
                                    cu_seqlens, max_seqlen, "auto");
    });
  }
  const Problem problem = make_problem(s, wkv_b, softmax_scale, false);
  const SparseGrads g = sparse.backward(
      problem.p, grad_out.reshape({T, H, -1}), q.reshape({T, H, -1}), kv_latent.reshape({T, -1}),
      k_rope.reshape({T, -1}), problem.w_k, problem.w_v, key_rows(topk_indices, starts), out.reshape({T, H, -1}),
      lse.reshape({T, H}));
  return {g.grad_q.view(q.sizes()), g.grad_kv_latent.reshape(kv_latent.sizes()), g.grad_k_rope.reshape(k_rope.sizes()),
          at::cat({g.grad_w_k, g.grad_w_v}, 1).reshape(wkv_b.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CPU, m) {
  m.impl("mla_sparse_attention", TORCH_FN(mla_sparse_attention_device));
  m.impl("mla_sparse_attention_backward", TORCH_FN(mla_sparse_attention_backward_device));
}

TORCH_LIBRARY_IMPL(torch_mla, CUDA, m) {
  m.impl("mla_sparse_attention", TORCH_FN(mla_sparse_attention_device));
  m.impl("mla_sparse_attention_backward", TORCH_FN(mla_sparse_attention_backward_device));
}

}  // namespace torch_mla
