// The CPU and CUDA kernels of mla_attention (docs/design.md §10.1): shared argument checks → the
// sequence list → the latent layer → the attention core chosen for the call → output shaping.
// Each step is written once here; the cores (cores/core.h) see only per-head tensors.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/table.h"
#include "torch_mla/layer/latent.h"
#include "torch_mla/layer/max_logits.h"
#include "torch_mla/layer/sequences.h"
#include "torch_mla/layer/checked_call.h"
#include "torch_mla/layer/checks.h"

namespace torch_mla {
namespace {

// The inputs' dims: handed down by the Autograd kernel, which checked these tensors, or checked
// here (a call without it: inference_mode, torch.compile's graphs, opcheck). layer/checked_call.h.
MlaDims checked_dims(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                     const at::Tensor& wkv_b, const std::optional<at::Tensor>& cu_seqlens) {
  if (auto dims = CheckedCall::take(q, kv_latent, k_rope, wkv_b, cu_seqlens)) return *dims;
  return check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens);
}

// The core a call runs: the layer above passes a resolved name, which is checked against that
// core's own limits only; "auto" (a direct call) is a selection (docs/design.md §10.1). A name
// that selection allowed but this build lacks is a bug.
const AttentionCore& core_for(const at::Tensor& q, const MlaDims& d, c10::string_view requested) {
  const std::string name = resolve_core_name(q, d.dim_nope, d.dim_rope, d.dim_v, d.varlen, std::string(requested));
  const AttentionCore* found = find_core(name);
  TORCH_CHECK(found != nullptr, "torch_mla.mla_attention: core \"", name, "\" is not in this build");
  return *found;
}

// The sequence list a core needs: read on the host only where the core walks the spans or
// max_seqlen is not given (docs/design.md §3.2).
Sequences sequences_for(const AttentionCore& core, const MlaDims& d, const std::optional<at::Tensor>& cu_seqlens,
                        int64_t max_seqlen) {
  return make_sequences(d, cu_seqlens, max_seqlen, find_entry(core.name)->host_spans);
}

// (T, H, D) views of a padded (B, S, H, D) or packed (T, H, D) tensor.
at::Tensor per_head(const at::Tensor& t, int64_t tokens, int64_t heads) {
  return t.reshape({tokens, heads, t.size(-1)});
}

CoreProblem make_problem(const Sequences& seqs, const MlaDims& d, double softmax_scale, bool causal,
                         bool max_logits = false) {
  return {seqs, d.heads.expect_int(), d.dim_nope.expect_int(), d.dim_rope.expect_int(), d.dim_v.expect_int(),
          softmax_scale, causal, at::globalContext().deterministicAlgorithms(), max_logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_device(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen,
    c10::string_view core,
    bool return_max_logits) {
  const KernelDtypeGuard no_autocast;
  const c10::OptionalDeviceGuard device_guard(q.device());
  const MlaDims d = checked_dims(q, kv_latent, k_rope, wkv_b, cu_seqlens);
  const AttentionCore& attention = core_for(q, d, core);
  const Sequences seqs = sequences_for(attention, d, cu_seqlens, max_seqlen);
  const int64_t T = seqs.tokens, H = d.heads.expect_int();
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = d.dim_v.expect_int();
  const auto lse_shape = q.sizes().slice(0, q.dim() - 1);
  const auto stats = q.options().dtype(lse_dtype(q.scalar_type()));
  // max_logits: (H,) when asked for (docs/design.md §12), else an empty (0,) tensor.
  at::Tensor max_logits = return_max_logits ? at::full({H}, -std::numeric_limits<double>::infinity(), stats)
                                            : at::empty({0}, stats);
  if (T == 0) return {at::empty(out_shape, q.options()), at::empty(lse_shape, stats), max_logits};
  const at::Tensor kv = expand_kv(kv_latent.reshape({T, -1}), wkv_b, H);
  const CoreProblem problem =
      make_problem(seqs, d, softmax_scale, causal, return_max_logits && !environment().recompute_max_logits);
  const at::Tensor q3 = per_head(q, T, H), k_rope2 = k_rope.reshape({T, -1}).contiguous();
  CoreOutputs o = attention.forward(problem, q3, kv, k_rope2);
  if (return_max_logits && o.max_logits.defined()) {
    max_logits = o.max_logits;
  } else if (return_max_logits) {
    // The shared fallback walks the sequences on the host: it reads cu_seqlens if the core did not.
    const Sequences with_spans = seqs.has_spans() ? seqs : make_sequences(d, cu_seqlens, max_seqlen, true);
    max_logits = max_logits_from_scores(make_problem(with_spans, d, softmax_scale, causal), q3, kv, k_rope2, o.lse);
  }
  return {o.out.view(out_shape), o.lse.view(lse_shape), max_logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_attention_backward_device(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    const at::Tensor& out,
    const at::Tensor& lse,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen,
    c10::string_view core) {
  const KernelDtypeGuard no_autocast;
  const c10::OptionalDeviceGuard device_guard(q.device());
  const MlaDims d = check_mla_backward_inputs(grad_out, q, kv_latent, k_rope, wkv_b, out, lse, cu_seqlens);
  const AttentionCore& attention = core_for(q, d, core);
  const Sequences seqs = sequences_for(attention, d, cu_seqlens, max_seqlen);
  const int64_t T = seqs.tokens, H = d.heads.expect_int();
  if (T == 0) {
    const auto zeros = [](const at::Tensor& t) { return at::zeros_like(t, at::MemoryFormat::Contiguous); };
    return {zeros(q), zeros(kv_latent), zeros(k_rope), zeros(wkv_b)};
  }
  const at::Tensor c2 = kv_latent.reshape({T, -1});
  CoreGrads g;
  {
    // The recomputed KV lives only through the core's backward.
    const at::Tensor kv = expand_kv(c2, wkv_b, H);
    g = attention.backward(make_problem(seqs, d, softmax_scale, causal), per_head(grad_out, T, H), per_head(q, T, H), kv,
                      k_rope.reshape({T, -1}).contiguous(), per_head(out, T, H), lse.reshape({T, H}));
  }
  const LatentGrads latent = project_kv_grads(g.grad_kv, g.grad_k_rope, c2, wkv_b);
  return {g.grad_q.to(q.scalar_type()).view(q.sizes()), latent.kv_latent.view(kv_latent.sizes()),
          latent.k_rope.view(k_rope.sizes()), latent.wkv_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mla, CPU, m) {
  m.impl("mla_attention", TORCH_FN(mla_attention_device));
  m.impl("mla_attention_backward", TORCH_FN(mla_attention_backward_device));
}

TORCH_LIBRARY_IMPL(torch_mla, CUDA, m) {
  m.impl("mla_attention", TORCH_FN(mla_attention_device));
  m.impl("mla_attention_backward", TORCH_FN(mla_attention_backward_device));
}

}  // namespace torch_mla
