// The op schemas (the one definition of the torch_mla library) and their dispatcher entry points.
#include "torch_mla/mla_attention.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "torch_mla/cores/select.h"
#include "torch_mla/mla_shapes.h"

namespace torch_mla {

namespace {

// _explain / _choose_core: which attention core a call takes and why (docs/design.md §10.3).
std::string explain(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                    const at::Tensor& wkv_b, const std::optional<at::Tensor>& cu_seqlens, c10::string_view backend) {
  const MlaDims d = check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens);
  return explain_choice(query_for(q, d.dim_nope, d.dim_rope, d.dim_v, d.varlen), std::string(backend));
}

// The selection rule on a query given field by field, so that it can be tested on any machine.
std::string choose_core_for(c10::string_view device, int64_t capability, at::ScalarType dtype, int64_t dim_nope,
                            int64_t dim_rope, int64_t dim_v, bool varlen, bool deterministic, int64_t cudnn_version,
                            std::vector<int64_t> kernel_archs, bool simt_built, c10::string_view backend) {
  CoreQuery query;
  query.device = c10::Device(std::string(device)).type();
  query.capability = static_cast<int>(capability);
  query.dtype = dtype;
  query.dim_nope = dim_nope;
  query.dim_rope = dim_rope;
  query.dim_v = dim_v;
  query.varlen = varlen;
  query.deterministic = deterministic;
  query.cudnn_version = cudnn_version;
  query.kernel_archs.assign(kernel_archs.begin(), kernel_archs.end());
  query.simt_built = simt_built;
  return explain_choice(query, std::string(backend));
}

std::vector<int64_t> kernel_archs() {
  const std::vector<int> archs = compiled_kernel_archs();
  return {archs.begin(), archs.end()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  m.def(
      "mla_attention(Tensor q, Tensor kv_latent, Tensor k_rope, Tensor wkv_b, float softmax_scale, "
      "bool causal, Tensor? cu_seqlens, SymInt max_seqlen, str backend=\"auto\", bool return_max_logits=False) "
      "-> (Tensor out, Tensor lse, Tensor max_logits)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "mla_attention_backward(Tensor grad_out, Tensor q, Tensor kv_latent, Tensor k_rope, "
      "Tensor wkv_b, Tensor out, Tensor lse, float softmax_scale, bool causal, Tensor? cu_seqlens, "
      "SymInt max_seqlen, str backend=\"auto\") -> (Tensor grad_q, Tensor grad_kv_latent, Tensor grad_k_rope, "
      "Tensor grad_wkv_b)",
      {at::Tag::pt2_compliant_tag});
  m.def("_explain(Tensor q, Tensor kv_latent, Tensor k_rope, Tensor wkv_b, Tensor? cu_seqlens, str backend) -> str",
        TORCH_FN(explain));
  m.def("_choose_core(str device, int capability, ScalarType dtype, int dim_nope, int dim_rope, int dim_v, "
        "bool varlen, bool deterministic, int cudnn_version, int[] kernel_archs, bool simt_built, str backend) -> str",
        TORCH_FN(choose_core_for));
  m.def("_kernel_archs() -> int[]", TORCH_FN(kernel_archs));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention(
    const at::Tensor& q,
    const at::Tensor& kv_latent,
    const at::Tensor& k_rope,
    const at::Tensor& wkv_b,
    double softmax_scale,
    bool causal,
    const std::optional<at::Tensor>& cu_seqlens,
    c10::SymInt max_seqlen,
    c10::string_view backend,
    bool return_max_logits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::mla_attention", "")
                       .typed<decltype(mla_attention)>();
  return op.call(q, kv_latent, k_rope, wkv_b, softmax_scale, causal, cu_seqlens, std::move(max_seqlen), backend,
                 return_max_logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mla_attention_backward(
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
    c10::SymInt max_seqlen,
    c10::string_view backend) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mla::mla_attention_backward", "")
                       .typed<decltype(mla_attention_backward)>();
  return op.call(grad_out, q, kv_latent, k_rope, wkv_b, out, lse, softmax_scale, causal, cu_seqlens,
                 std::move(max_seqlen), backend);
}

}  // namespace torch_mla
