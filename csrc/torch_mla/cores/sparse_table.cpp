// The sparse cores' registry, and the selection of sparse calls over the one core table
// (docs/design.md §16.4, §16.5).
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/layer/sparse_checks.h"

namespace torch_mla {
namespace {

// The registered sparse cores; function-local so that registrations from any translation unit find it.
std::vector<const SparseCore*>& registry() {
  static std::vector<const SparseCore*> cores;
  return cores;
}

bool has_sparse_form(const std::string& name) {
  const CoreEntry* entry = find_entry(name);
  return entry != nullptr && entry->sparse_declines != nullptr;
}

}  // namespace

SparseCoreRegistration::SparseCoreRegistration(const SparseCore& core) {
  TORCH_CHECK(has_sparse_form(core.name), "torch_mla: sparse core \"", core.name,
              "\" is registered but has no sparse form in cores/table.cpp");
  registry().push_back(&core);
}

const SparseCore* find_sparse_core(const std::string& name) {
  for (const SparseCore* core : registry()) {
    if (core->name == name) return core;
  }
  return nullptr;
}

std::vector<std::string> sparse_core_names() {
  std::vector<std::string> names;
  for (const CoreEntry& entry : core_table()) {
    if (entry.sparse_declines != nullptr) names.emplace_back(entry.name);
  }
  return names;
}

std::string resolve_sparse_core(const std::string& requested) {
  // TORCH_MLA_CORE forces a core for every op; one without a sparse form leaves sparse calls to
  // their own rule, so that forcing e.g. "efficient" for the dense op does not break sparse callers.
  const std::string name = requested == "auto" ? requested_core(requested) : requested;
  if (has_sparse_form(name)) return name;
  if (requested == "auto") return "auto";
  std::string listing;
  for (const std::string& n : sparse_core_names()) listing += ", " + n;
  C10_THROW_ERROR(ValueError, c10::str("torch_mla.mla_sparse_attention: core \"", name,
                                       "\" has no sparse form; a sparse call takes one of: auto", listing));
}

const char* dense_shortcut_declines(const at::Tensor& topk_indices, const Sequences& seqs, const std::string& core) {
  if (!topk_indices.is_cpu()) return "decided for CPU tensors only (on CUDA the decision would cost a host sync)";
  const bool prefixes = check_topk_values_on_host(topk_indices, seqs);
  if (core != "auto") return "a sparse core is named; only \"auto\" takes the shortcut";
  if (!prefixes) return "a row selects less than its whole causal prefix";
  return nullptr;
}

}  // namespace torch_mla
