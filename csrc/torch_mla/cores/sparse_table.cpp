// The sparse cores' registry and selection (docs/design.md §16.4).
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>


#include "torch_mla/cores/sparse_core.h"
#include "torch_mla/cores/table.h"

namespace torch_mla {
namespace {

// In registration order; function-local so that registrations from any translation unit find it.
std::vector<const SparseCore*>& registry() {
  static std::vector<const SparseCore*> cores;
  return cores;
}

}  // namespace

SparseCoreRegistration::SparseCoreRegistration(const SparseCore& core) { registry().push_back(&core); }

const SparseCore* find_sparse_core(const std::string& name) {
  for (const SparseCore* core : registry()) {
    if (core->name == name) return core;
  }
  return nullptr;
}

std::vector<std::string> sparse_core_names() {
  std::vector<std::string> names;
  for (const SparseCore* core : registry()) names.push_back(core->name);
  return names;
}

std::string resolve_sparse_core(const std::string& requested) {
  // TORCH_MLA_CORE forces a core for every op; one without a sparse form leaves sparse calls to
  // their own rule, so that forcing e.g. "cpu" for the dense op does not break sparse callers.
  const std::string name = requested == "auto" ? requested_core(requested) : requested;
  if (find_sparse_core(name) != nullptr) return name;
  if (requested == "auto") return "auto";
  std::string listing;
  for (const std::string& n : sparse_core_names()) listing += ", " + n;
  C10_THROW_ERROR(ValueError, c10::str("torch_mla.mla_sparse_attention: core \"", name,
                                       "\" has no sparse form; a sparse call takes one of: auto", listing));
}

}  // namespace torch_mla
