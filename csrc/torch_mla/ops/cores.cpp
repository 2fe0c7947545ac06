// Private ops over the core table (cores/table.h) for torch_mla.cores and tests: which core a call
// (dense or sparse) takes and why, the selection rule on a described call, the table's names, the
// archs compiled, the chunk-budget test hook (layer/chunking.h), the grid order of our kernels
// (cores/cuda/grid_order.h) and the hot path's counters (docs/design.md §3.2, §10.1).
#include <torch/library.h>

#include "torch_mla/cores/cuda/grid_order.h"
#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/cores/table.h"
#include "torch_mla/layer/checks.h"
#include "torch_mla/layer/chunking.h"
#include "torch_mla/layer/sequences.h"
#include "torch_mla/layer/sparse_checks.h"

namespace torch_mla {
namespace {

// _explain / _choose_core: which attention core a call takes and why (docs/design.md §10.3).
std::string explain(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                    const at::Tensor& wkv_b, const std::optional<at::Tensor>& cu_seqlens, c10::string_view core) {
  const MlaDims d = check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens);
  return explain_choice(query_for(q, d.dim_nope, d.dim_rope, d.dim_v, d.varlen), std::string(core));
}

// _explain_sparse: the same for a sparse call (§16.4, §16.5): the core it runs on the first line
// (mla_attention's core when the dense shortcut takes it), then "dense shortcut: yes" or
// "dense shortcut: no: why", then each core's sparse form. Reads the indices (the shortcut depends
// on them), and checks CPU ones as the call does.
std::string explain_sparse(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                           const at::Tensor& wkv_b, const at::Tensor& topk_indices,
                           const std::optional<at::Tensor>& cu_seqlens, c10::string_view core) {
  const SparseDims s = check_sparse_inputs(q, kv_latent, k_rope, wkv_b, topk_indices, cu_seqlens);
  const std::string name = resolve_sparse_core(std::string(core));
  const CoreQuery query = query_for(q, s.mla.dim_nope, s.mla.dim_rope, s.mla.dim_v, s.mla.varlen);
  const std::string lines = explain_choice(query, name, /*sparse=*/true);
  const Sequences seqs = naming_errors_as(
      kSparseOp, [&] { return make_sequences(s.mla, cu_seqlens, /*max_seqlen=*/0, topk_indices.is_cpu()); });
  const char* declines = dense_shortcut_declines(topk_indices, seqs, name);
  const size_t first = lines.find('\n');
  const std::string chosen = declines == nullptr ? choose_core(query, requested_core("auto")) : lines.substr(0, first);
  return chosen + "\ndense shortcut: " + (declines == nullptr ? std::string("yes") : std::string("no: ") + declines) +
         lines.substr(first);
}

// The selection rule on a query given field by field, so that it can be tested on any machine;
// `sparse`: the rule over the cores' sparse forms (without the dense shortcut, which needs indices).
std::string choose_core_for(c10::string_view device, int64_t capability, at::ScalarType dtype, int64_t dim_nope,
                            int64_t dim_rope, int64_t dim_v, bool varlen, bool deterministic, int64_t cudnn_version,
                            std::vector<int64_t> kernel_archs, bool simt_built, c10::string_view core, bool sparse) {
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
  return sparse ? explain_choice(query, resolve_sparse_core(std::string(core)), /*sparse=*/true)
                : explain_choice(query, std::string(core));
}

// _resolve_core: the concrete core a call takes, for Python code that runs several calls as one
// (context parallelism keeps the forward's core for its backward, docs/design.md §10.1).
std::string resolve(const at::Tensor& q, const at::Tensor& kv_latent, const at::Tensor& k_rope,
                    const at::Tensor& wkv_b, const std::optional<at::Tensor>& cu_seqlens, c10::string_view core) {
  const MlaDims d = check_mla_inputs(q, kv_latent, k_rope, wkv_b, cu_seqlens);
  return resolve_core_name(q, d.dim_nope, d.dim_rope, d.dim_v, d.varlen, std::string(core));
}

// _core_host_spans: whether a core reads a packed call's cu_seqlens on the host (cores/table.h).
bool core_host_spans(c10::string_view core) {
  const CoreEntry* entry = find_entry(std::string(core));
  TORCH_CHECK_VALUE(entry != nullptr, "torch_mla: no core named \"", std::string(core), "\"");
  return entry->host_spans;
}

std::vector<int64_t> kernel_archs() {
  const std::vector<int> archs = compiled_kernel_archs();
  return {archs.begin(), archs.end()};
}

// _set_grid_order: the order of our kernels' CTAs for every later launch, process-wide (the A/B
// benchmark of docs/design.md §10.2); returns the previous order's name.
std::string set_grid_order(c10::string_view order) {
  const std::optional<cuda::GridOrder> parsed = cuda::grid_order_from_name(order);
  TORCH_CHECK_VALUE(parsed.has_value(), "torch_mla._set_grid_order: order must be \"query_fastest\" or ",
                    "\"head_fastest\", got \"", std::string(order), "\"");
  return std::string(cuda::grid_order_name(cuda::grid_order_setting.exchange(*parsed)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_mla, m) {
  m.def("_explain(Tensor q, Tensor kv_latent, Tensor k_rope, Tensor wkv_b, Tensor? cu_seqlens, str core) -> str",
        TORCH_FN(explain));
  m.def("_choose_core(str device, int capability, ScalarType dtype, int dim_nope, int dim_rope, int dim_v, "
        "bool varlen, bool deterministic, int cudnn_version, int[] kernel_archs, bool simt_built, str core, "
        "bool sparse=False) -> str",
        TORCH_FN(choose_core_for));
  m.def("_explain_sparse(Tensor q, Tensor kv_latent, Tensor k_rope, Tensor wkv_b, Tensor topk_indices, "
        "Tensor? cu_seqlens, str core) -> str",
        TORCH_FN(explain_sparse));
  m.def("_core_names() -> str[]", TORCH_FN(core_names));
  m.def("_kernel_archs() -> int[]", TORCH_FN(kernel_archs));
  m.def("_set_chunk_elements(int n) -> int", TORCH_FN(set_chunk_elements));
  m.def("_set_grid_order(str order) -> str", TORCH_FN(set_grid_order));
  m.def("_resolve_core(Tensor q, Tensor kv_latent, Tensor k_rope, Tensor wkv_b, Tensor? cu_seqlens, str core) -> str",
        TORCH_FN(resolve));
  // Test hooks of the hot path (issue 25): counters, and the environment read again.
  m.def("_core_host_spans(str core) -> bool", TORCH_FN(core_host_spans));
  m.def("_host_reads() -> int", TORCH_FN(host_reads));
  m.def("_core_selections() -> int", TORCH_FN(core_selections));
  m.def("_read_environment() -> ()", TORCH_FN(read_environment));
}

}  // namespace torch_mla
