#include "torch_mla/cores/table.h"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/util/Exception.h>

#include <algorithm>
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

// "auto" or a core's name, else a ValueError listing the names.
void check_core_name(const std::string& core) {
  const auto names = core_names();
  if (core == "auto" || std::find(names.begin(), names.end(), core) != names.end()) return;
  std::string list;
  for (const auto& name : names) list += (list.empty() ? "" : ", ") + name;
  TORCH_CHECK_VALUE(false, "torch_mla.mla_attention: core must be \"auto\" or one of ", list, "; got \"", core, "\"");
}

std::unordered_map<std::string, const AttentionCore*>& registry() {
  static std::unordered_map<std::string, const AttentionCore*> cores;
  return cores;
}

}  // namespace

const std::vector<CoreEntry>& core_table() {
  using c10::DeviceType;
  static const std::vector<CoreEntry> table = {
      {"cudnn", DeviceType::CUDA, true, cudnn_declines},
      {"cuda", DeviceType::CUDA, true, cuda_declines},
      {"efficient", DeviceType::CUDA, true, efficient_declines},
      {"cpu", DeviceType::CPU, true, serves_all},
      {"composed", std::nullopt, true, serves_all},
      {"simt", DeviceType::CPU, false, simt_declines},
  };
  return table;
}

std::vector<std::string> core_names() {
  std::vector<std::string> names;
  for (const CoreEntry& entry : core_table()) names.emplace_back(entry.name);
  return names;
}

namespace {

Reason entry_reason(const CoreEntry& entry, const CoreQuery& query) {
  if (entry.device && *entry.device != query.device) return "runs on " + device_name(*entry.device) + " tensors only";
  return entry.declines(query);
}

}  // namespace

std::vector<int> compiled_kernel_archs() {
  std::vector<int> archs;
  if (find_core("cuda") == nullptr) return archs;
  std::stringstream list(TORCH_MLA_CUDA_ARCH_LIST);
  for (std::string item; std::getline(list, item, ';');) {
    if (!item.empty()) archs.push_back(std::stoi(item));
  }
  return archs;
}

CoreChoice choose_core(const CoreQuery& query, const std::string& core) {
  CoreChoice choice;
  for (const CoreEntry& entry : core_table()) choice.why.emplace_back(entry.name, entry_reason(entry, query));
  if (core == "auto") {
    for (size_t i = 0; i < core_table().size(); ++i) {
      if (core_table()[i].in_auto && !choice.why[i].second) {
        choice.core = choice.why[i].first;
        return choice;
      }
    }
    TORCH_CHECK(false, "torch_mla.mla_attention: no attention core serves this call");  // composed serves all
  }
  check_core_name(core);
  std::string can, why;
  for (const auto& [name, reason] : choice.why) {
    if (!reason) can += (can.empty() ? "" : ", ") + name;
    if (name == core && reason) why = *reason;
  }
  TORCH_CHECK_VALUE(why.empty(), "torch_mla.mla_attention: core \"", core, "\" cannot serve this call: ", why,
                    ". Cores that can: ", can);
  choice.core = core;
  return choice;
}

std::string requested_core(const std::string& core) {
  if (core != "auto") return core;
  for (const char* variable : {"TORCH_MLA_CORE", "TORCH_MLA_BACKEND"}) {
    const char* env = std::getenv(variable);
    if (env != nullptr && env[0] != '\0') return env;
  }
  return core;
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
  q.kernel_archs = compiled_kernel_archs();
  q.simt_built = find_core("simt") != nullptr;
  return q;
}

std::string resolve_core_name(const at::Tensor& like, const c10::SymInt& dim_nope, const c10::SymInt& dim_rope,
                              const c10::SymInt& dim_v, bool varlen, const std::string& core) {
  const std::string requested = requested_core(core);
  const auto device = like.device().type();
  if (device != c10::DeviceType::CPU && device != c10::DeviceType::CUDA) {
    check_core_name(requested);
    return requested;
  }
  const std::string chosen = choose_core(query_for(like, dim_nope, dim_rope, dim_v, varlen), requested).core;
  if (requested == "auto" && chosen == "composed" && device == c10::DeviceType::CUDA) {
    TORCH_WARN_ONCE("torch_mla.mla_attention: no fused CUDA core serves dtype ", like.scalar_type(),
                    " with (Dn+Dr, Dv) = (", dim_nope + dim_rope, ", ", dim_v,
                    ") on this device; using the slower composed-ATen core (torch_mla.explain(...) says why "
                    "each fused core declined). This warning is shown once.");
  }
  return chosen;
}

std::string explain_choice(const CoreQuery& query, const std::string& core) {
  const CoreChoice choice = choose_core(query, requested_core(core));
  std::string text = choice.core + "\n";
  for (const auto& [name, why] : choice.why) text += name + (why ? ": no: " + *why : ": yes") + "\n";
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
