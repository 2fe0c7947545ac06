#include "torch_mla/cores/table.h"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <sstream>
#include <unordered_map>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/cuda/mla_kernel_smem.h"
#include "torch_mla/cores/cuda/tuned_shapes.h"

#ifndef TORCH_MLA_CUDA_ARCH_LIST
#define TORCH_MLA_CUDA_ARCH_LIST ""
#endif

namespace torch_mla {
namespace {

bool is_16bit(c10::ScalarType t) { return t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half; }

std::string to_string(int64_t v) { return std::to_string(v); }

std::string dims(int64_t qk, int64_t v) { return "(" + to_string(qk) + ", " + to_string(v) + ")"; }

std::string arch_list(const std::vector<int>& archs) {
  std::string s;
  for (int a : archs) s += (s.empty() ? "sm_" : ", sm_") + std::to_string(a);
  return s;
}

// The dtypes and (Dn+Dr, Dv) shapes our kernels are instantiated for (cores/cuda/tuned_shapes.h).
Reason untuned_shape(const CoreQuery& q) {
  const int64_t qk = q.dim_nope + q.dim_rope;
  if (!is_16bit(q.dtype)) return "takes bfloat16/float16, got " + std::string(c10::toString(q.dtype));
  std::string tuned;
  bool found = false;
  for (const auto& shape : cuda::kTunedShapes) {
    tuned += (tuned.empty() ? "" : " or ") + dims(shape.dim_qk, shape.dim_v);
    found = found || (shape.dim_qk == qk && shape.dim_v == q.dim_v);
  }
  if (!found) return "tuned for (Dn+Dr, Dv) = " + tuned + ", got " + dims(qk, q.dim_v);
  // A 16-byte chunk of a K row comes either from the KV buffer or from k_rope, never from both.
  if (q.dim_nope % 8 != 0 || q.dim_rope % 8 != 0) return std::string("needs Dn and Dr multiples of 8");
  return std::nullopt;
}

Reason cuda_declines(const CoreQuery& q) {
  if (q.kernel_archs.empty()) return std::string("not compiled into this build (no nvcc, or TORCH_MLA_CUDA=0)");
  // SASS runs on the arch it was built for and on later minor versions of the same major one.
  int arch = 0;
  for (int a : q.kernel_archs) {
    if (a / 10 == q.capability / 10 && a % 10 <= q.capability % 10) arch = std::max(arch, a);
  }
  if (arch == 0) {
    return "not compiled for sm_" + std::to_string(q.capability) + " (built for " + arch_list(q.kernel_archs) + ")";
  }
  if (auto r = untuned_shape(q)) return r;
  const int64_t qk = q.dim_nope + q.dim_rope, limit = cuda::max_smem_per_block(q.capability);
  const int64_t need = std::max({cuda::forward_smem_bytes(qk, q.dim_v), cuda::backward_smem_bytes(qk, q.dim_v),
                                 cuda::backward_dq_smem_bytes(qk, q.dim_v)});
  if (need > limit) {
    return "needs " + to_string(need) + " B of shared memory per CTA, sm_" + std::to_string(q.capability) +
           " allows " + to_string(limit);
  }
  return std::nullopt;
}

Reason cudnn_declines(const CoreQuery& q) {
  if (q.cudnn_version == 0) return std::string("this torch build has no cuDNN");
  if (q.capability < 90) {
    return "chosen on sm_90 and later only (on sm_" + std::to_string(q.capability) +
           " its backward is limited to head dim 128)";
  }
  if (!is_16bit(q.dtype)) return "takes bfloat16/float16, got " + std::string(c10::toString(q.dtype));
  if (q.varlen) return std::string("packed sequences (cu_seqlens) are not wired to cuDNN's ragged layout");
  if (q.deterministic) return std::string("its backward is not deterministic");
  const int64_t qk = q.dim_nope + q.dim_rope;
  if (qk % 8 != 0 || q.dim_v % 8 != 0 || qk > 256 || q.dim_v > 256) {
    return "needs head dims multiples of 8 and at most 256, got " + dims(qk, q.dim_v);
  }
  return std::nullopt;
}

Reason efficient_declines(const CoreQuery& q) {
  if (q.capability < 50) return "needs sm_50 or later, got sm_" + std::to_string(q.capability);
  if (!(is_16bit(q.dtype) || q.dtype == c10::ScalarType::Float)) {
    return "takes float32/bfloat16/float16, got " + std::string(c10::toString(q.dtype));
  }
  const int64_t align = q.dtype == c10::ScalarType::Float ? 4 : 8, qk = q.dim_nope + q.dim_rope;
  if (qk % align != 0 || q.dim_v % align != 0) {
    return "needs head dims multiples of " + to_string(align) + ", got " + dims(qk, q.dim_v);
  }
  if (q.deterministic) return std::string("its backward is not deterministic");
  return std::nullopt;
}

Reason serves_all(const CoreQuery&) { return std::nullopt; }

Reason simt_declines(const CoreQuery& q) {
  if (!q.simt_built) return std::string("not compiled into this build");
  return untuned_shape(q);
}

std::string device_name(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? "CUDA" : device == c10::DeviceType::CPU ? "CPU" : c10::DeviceTypeName(device);
}

const char* op_name(bool sparse) { return sparse ? "torch_mla.mla_sparse_attention" : "torch_mla.mla_attention"; }

// "auto" or a core's name, else a ValueError listing the names.
void check_core_name(const std::string& core, bool sparse) {
  if (core == "auto" || find_entry(core) != nullptr) return;
  std::string list;
  for (const auto& name : core_names()) list += (list.empty() ? "" : ", ") + name;
  TORCH_CHECK_VALUE(false, op_name(sparse), ": core must be \"auto\" or one of ", list, "; got \"", core, "\"");
}

std::unordered_map<std::string, const AttentionCore*>& registry() {
  static std::unordered_map<std::string, const AttentionCore*> cores;
  return cores;
}

}  // namespace

const std::vector<CoreEntry>& core_table() {
  using c10::DeviceType;
  // host_spans: cpu and composed loop over the sequences on the host; efficient maps its packed
  // lse rows through them; cudnn takes padded calls only; cuda and simt read cu_seqlens in the
  // kernels. Sparse forms: cpu and composed, every dtype their dense forms take.
  static const std::vector<CoreEntry> table = {
      {"cudnn", DeviceType::CUDA, true, cudnn_declines, false},
      {"cuda", DeviceType::CUDA, true, cuda_declines, false},
      {"efficient", DeviceType::CUDA, true, efficient_declines, true},
      {"cpu", DeviceType::CPU, true, serves_all, true, serves_all},
      {"composed", std::nullopt, true, serves_all, true, serves_all},
      {"simt", DeviceType::CPU, false, simt_declines, false},
  };
  return table;
}

std::vector<std::string> core_names() {
  std::vector<std::string> names;
  for (const CoreEntry& entry : core_table()) names.emplace_back(entry.name);
  return names;
}

Reason entry_declines(const CoreEntry& entry, const CoreQuery& query, bool sparse) {
  if (sparse && entry.sparse_declines == nullptr) return std::string("has no sparse form");
  if (entry.device && *entry.device != query.device) return "runs on " + device_name(*entry.device) + " tensors only";
  return sparse ? entry.sparse_declines(query) : entry.declines(query);
}

std::vector<int> compiled_kernel_archs() {
  std::vector<int> archs;
  if (find_core("cuda") == nullptr) return archs;
  std::stringstream list(TORCH_MLA_CUDA_ARCH_LIST);
  for (std::string item; std::getline(list, item, ';');) {
    if (!item.empty()) archs.push_back(std::stoi(item));
  }
  return archs;
}

bool CoreQuery::operator==(const CoreQuery& o) const {
  return device == o.device && capability == o.capability && dtype == o.dtype && dim_nope == o.dim_nope &&
         dim_rope == o.dim_rope && dim_v == o.dim_v && varlen == o.varlen && deterministic == o.deterministic &&
         cudnn_version == o.cudnn_version && kernel_archs == o.kernel_archs && simt_built == o.simt_built;
}

const CoreEntry* find_entry(const std::string& name) {
  for (const CoreEntry& entry : core_table()) {
    if (name == entry.name) return &entry;
  }
  return nullptr;
}

namespace {

std::atomic<int64_t> selections{0};

// The first core `auto` may pick for the query (its sparse form when `sparse`). A declining core of
// the query's device builds its reason string, so the last answer of each form is kept per thread:
// a training loop repeats one query.
std::string first_serving(const CoreQuery& query, bool sparse) {
  thread_local std::optional<std::pair<CoreQuery, std::string>> last[2];
  auto& cached = last[sparse ? 1 : 0];
  if (cached && cached->first == query) return cached->second;
  for (const CoreEntry& entry : core_table()) {
    if (!entry.in_auto || (entry.device && *entry.device != query.device)) continue;
    if (sparse && entry.sparse_declines == nullptr) continue;
    if (!(sparse ? entry.sparse_declines : entry.declines)(query)) {
      cached.emplace(query, entry.name);
      return entry.name;
    }
  }
  TORCH_CHECK(false, op_name(sparse), ": no attention core serves this call");  // composed serves all
}

}  // namespace

int64_t core_selections() { return selections.load(); }

std::string choose_core(const CoreQuery& query, const std::string& core, bool sparse) {
  if (core == "auto") return first_serving(query, sparse);
  check_core_name(core, sparse);
  const Reason why = entry_declines(*find_entry(core), query, sparse);
  if (why) {
    std::string can;
    for (const CoreEntry& entry : core_table()) {
      if (!entry_declines(entry, query, sparse)) can += (can.empty() ? "" : ", ") + std::string(entry.name);
    }
    TORCH_CHECK_VALUE(false, op_name(sparse), ": core \"", core, "\" cannot serve this call: ", *why,
                      ". Cores that can: ", can);
  }
  return core;
}

namespace {

Environment read_variables() {
  Environment env;
  for (const char* variable : {"TORCH_MLA_CORE", "TORCH_MLA_BACKEND"}) {
    const char* value = std::getenv(variable);
    if (value != nullptr && value[0] != '\0') {
      env.core = value;
      break;
    }
  }
  const char* max_logits = std::getenv("TORCH_MLA_MAX_LOGITS");
  env.recompute_max_logits = max_logits != nullptr && std::string(max_logits) == "recompute";
  return env;
}

Environment& environment_storage() {
  static Environment env = read_variables();
  return env;
}

}  // namespace

const Environment& environment() { return environment_storage(); }

// Not synchronised with calls in flight: tests call it between calls, after changing a variable.
void read_environment() { environment_storage() = read_variables(); }

std::string requested_core(const std::string& core) {
  if (core != "auto") return core;
  const std::string& forced = environment().core;
  return forced.empty() ? core : forced;
}

CoreQuery query_for(const at::Tensor& like, const c10::SymInt& dim_nope, const c10::SymInt& dim_rope,
                    const c10::SymInt& dim_v, bool varlen) {
  CoreQuery q;
  q.device = like.device().type();
  q.dtype = like.scalar_type();
  // Head dims decide the core: a symbolic one (torch.compile, dynamic shapes) is specialised.
  q.dim_nope = dim_nope.guard_int(__FILE__, __LINE__);
  q.dim_rope = dim_rope.guard_int(__FILE__, __LINE__);
  q.dim_v = dim_v.guard_int(__FILE__, __LINE__);
  q.varlen = varlen;
  q.deterministic = at::globalContext().deterministicAlgorithms();
  if (q.device == c10::DeviceType::CUDA) {
    q.capability = cuda_capability(like.device().index());
    const auto& hooks = at::detail::getCUDAHooks();
    q.cudnn_version = hooks.hasCuDNN() ? hooks.versionRuntimeCuDNN() : 0;
  }
  // What this build compiled is fixed once the library is loaded.
  static const std::vector<int> kernel_archs = compiled_kernel_archs();
  static const bool simt_built = find_core("simt") != nullptr;
  q.kernel_archs = kernel_archs;
  q.simt_built = simt_built;
  return q;
}

std::string resolve_core_name(const at::Tensor& like, const c10::SymInt& dim_nope, const c10::SymInt& dim_rope,
                              const c10::SymInt& dim_v, bool varlen, const std::string& core) {
  const std::string requested = requested_core(core);
  const auto device = like.device().type();
  if (device != c10::DeviceType::CPU && device != c10::DeviceType::CUDA) {
    check_core_name(requested, /*sparse=*/false);
    return requested;
  }
  if (requested == "auto") ++selections;
  const std::string chosen = choose_core(query_for(like, dim_nope, dim_rope, dim_v, varlen), requested);
  if (requested == "auto" && chosen == "composed" && device == c10::DeviceType::CUDA) {
    TORCH_WARN_ONCE("torch_mla.mla_attention: no fused CUDA core serves dtype ", like.scalar_type(),
                    " with (Dn+Dr, Dv) = (", dim_nope + dim_rope, ", ", dim_v,
                    ") on this device; using the slower composed-ATen core (torch_mla.explain(...) says why "
                    "each fused core declined). This warning is shown once.");
  }
  return chosen;
}

std::string explain_choice(const CoreQuery& query, const std::string& core, bool sparse) {
  std::string text = choose_core(query, sparse ? core : requested_core(core), sparse) + "\n";
  for (const CoreEntry& entry : core_table()) {
    const Reason why = entry_declines(entry, query, sparse);
    text += std::string(entry.name) + (why ? ": no: " + *why : ": yes") + "\n";
  }
  return text;
}

CoreRegistration::CoreRegistration(const AttentionCore& core) {
  const auto names = core_names();
  TORCH_CHECK(std::find(names.begin(), names.end(), core.name) != names.end(), "torch_mla: core \"", core.name,
              "\" is registered but not in cores/table.cpp");
  registry()[core.name] = &core;
}

const AttentionCore* find_core(const std::string& name) {
  const auto it = registry().find(name);
  return it == registry().end() ? nullptr : it->second;
}

}  // namespace torch_mla
