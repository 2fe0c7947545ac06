#include "torch_mla/cores/select.h"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <unordered_map>

#include "torch_mla/cores/core.h"
#include "torch_mla/cuda/mla_kernel_smem.h"

#ifndef TORCH_MLA_CUDA_ARCH_LIST
#define TORCH_MLA_CUDA_ARCH_LIST ""
#endif

namespace torch_mla {
namespace {

using Reason = std::optional<std::string>;

bool is_16bit(c10::ScalarType t) { return t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half; }

std::string to_string(int64_t v) { return std::to_string(v); }

std::string arch_list(const std::vector<int>& archs) {
  std::string s;
  for (int a : archs) s += (s.empty() ? "sm_" : ", sm_") + std::to_string(a);
  return s;
}

// (Dn+Dr, Dv) pairs our kernels are instantiated for: DeepSeek-V2/V3 and Kimi K2; MiniCPM3.
Reason untuned_shape(const CoreQuery& q) {
  const int64_t qk = q.dim_nope + q.dim_rope;
  if (!is_16bit(q.dtype)) return "takes bfloat16/float16, got " + std::string(c10::toString(q.dtype));
  if (!((qk == 192 && q.dim_v == 128) || (qk == 96 && q.dim_v == 64))) {
    return "tuned for (Dn+Dr, Dv) = (192, 128) or (96, 64), got (" + to_string(qk) + ", " + to_string(q.dim_v) + ")";
  }
  // A 16-byte chunk of a K row comes either from the KV buffer or from k_rope, never from both.
  if (q.dim_nope % 8 != 0 || q.dim_rope % 8 != 0) return "needs Dn and Dr multiples of 8";
  return std::nullopt;
}

Reason kernels_reason(const CoreQuery& q) {
  if (q.device != c10::DeviceType::CUDA) return std::string("runs on CUDA tensors only");
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

Reason cudnn_reason(const CoreQuery& q) {
  if (q.device != c10::DeviceType::CUDA) return std::string("runs on CUDA tensors only");
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
    return "needs head dims multiples of 8 and at most 256, got (" + to_string(qk) + ", " + to_string(q.dim_v) + ")";
  }
  return std::nullopt;
}

Reason efficient_reason(const CoreQuery& q) {
  if (q.device != c10::DeviceType::CUDA) return std::string("runs on CUDA tensors only");
  if (q.capability < 50) return "needs sm_50 or later, got sm_" + std::to_string(q.capability);
  if (!(is_16bit(q.dtype) || q.dtype == c10::ScalarType::Float)) {
    return "takes float32/bfloat16/float16, got " + std::string(c10::toString(q.dtype));
  }
  const int64_t align = q.dtype == c10::ScalarType::Float ? 4 : 8, qk = q.dim_nope + q.dim_rope;
  if (qk % align != 0 || q.dim_v % align != 0) {
    return "needs head dims multiples of " + to_string(align) + ", got (" + to_string(qk) + ", " + to_string(q.dim_v) + ")";
  }
  if (q.deterministic) return std::string("its backward is not deterministic");
  return std::nullopt;
}

Reason cpu_reason(const CoreQuery& q) {
  if (q.device != c10::DeviceType::CPU) return std::string("runs on CPU tensors only");
  return std::nullopt;
}

Reason simt_reason(const CoreQuery& q) {
  if (q.device != c10::DeviceType::CPU) return std::string("runs on CPU tensors only (emulated CUDA kernels)");
  if (!q.simt_built) return std::string("not compiled into this build");
  return untuned_shape(q);
}

// The order `auto` tries cores in, per device; simt (tests only) is never in it.
const std::vector<std::string>& auto_order(c10::DeviceType device) {
  static const std::vector<std::string> cuda = {"cudnn", "kernels", "efficient", "composed"};
  static const std::vector<std::string> cpu = {"cpu", "composed"};
  static const std::vector<std::string> other = {"composed"};
  return device == c10::DeviceType::CUDA ? cuda : device == c10::DeviceType::CPU ? cpu : other;
}

}  // namespace

std::vector<int> compiled_kernel_archs() {
  std::vector<int> archs;
  if (find_core("kernels") == nullptr) return archs;
  std::stringstream list(TORCH_MLA_CUDA_ARCH_LIST);
  for (std::string item; std::getline(list, item, ';');) {
    if (!item.empty()) archs.push_back(std::stoi(item));
  }
  return archs;
}

namespace {

// "auto" or a core's name, else a ValueError listing the names.
void check_backend_name(const std::string& backend) {
  const auto& names = core_names();
  TORCH_CHECK_VALUE(backend == "auto" || std::find(names.begin(), names.end(), backend) != names.end(),
                    "torch_mla.mla_attention: backend must be \"auto\" or one of cudnn, kernels, efficient, ",
                    "composed, cpu, simt; got \"", backend, "\"");
}

std::unordered_map<std::string, const AttentionCore*>& registry() {
  static std::unordered_map<std::string, const AttentionCore*> cores;
  return cores;
}

}  // namespace

const std::vector<std::string>& core_names() {
  static const std::vector<std::string> names = {"cudnn", "kernels", "efficient", "composed", "cpu", "simt"};
  return names;
}

std::optional<std::string> unsupported_reason(const std::string& core, const CoreQuery& query) {
  if (core == "kernels") return kernels_reason(query);
  if (core == "cudnn") return cudnn_reason(query);
  if (core == "efficient") return efficient_reason(query);
  if (core == "cpu") return cpu_reason(query);
  if (core == "simt") return simt_reason(query);
  if (core == "composed") return std::nullopt;  // any device, any dtype
  return "unknown core '" + core + "'";
}

CoreChoice choose_core(const CoreQuery& query, const std::string& backend) {
  CoreChoice choice;
  for (const std::string& name : core_names()) choice.why.emplace_back(name, unsupported_reason(name, query));
  const auto serves = [&](const std::string& name) {
    for (const auto& [core, why] : choice.why) {
      if (core == name) return !why.has_value();
    }
    return false;
  };
  if (backend == "auto") {
    for (const std::string& name : auto_order(query.device)) {
      if (serves(name)) {
        choice.core = name;
        return choice;
      }
    }
    TORCH_CHECK(false, "torch_mla.mla_attention: no attention core serves this call");  // composed serves all
  }
  check_backend_name(backend);
  if (!serves(backend)) {
    std::string can;
    for (const auto& [core, why] : choice.why) {
      if (!why) can += (can.empty() ? "" : ", ") + core;
    }
    std::string why;
    for (const auto& [core, reason] : choice.why) {
      if (core == backend) why = *reason;
    }
    TORCH_CHECK_VALUE(false, "torch_mla.mla_attention: backend \"", backend, "\" cannot serve this call: ", why,
                      ". Cores that can: ", can);
  }
  choice.core = backend;
  return choice;
}

std::string requested_backend(const std::string& backend) {
  if (backend != "auto") return backend;
  const char* env = std::getenv("TORCH_MLA_BACKEND");
  return env != nullptr && env[0] != '\0' ? std::string(env) : backend;
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
                              const c10::SymInt& dim_v, bool varlen, const std::string& backend) {
  const std::string requested = requested_backend(backend);
  const auto device = like.device().type();
  if (device != c10::DeviceType::CPU && device != c10::DeviceType::CUDA) {
    check_backend_name(requested);
    return requested;
  }
  const std::string core = choose_core(query_for(like, dim_nope, dim_rope, dim_v, varlen), requested).core;
  if (requested == "auto" && core == "composed" && device == c10::DeviceType::CUDA) {
    TORCH_WARN_ONCE("torch_mla.mla_attention: no fused CUDA core serves dtype ", like.scalar_type(),
                    " with (Dn+Dr, Dv) = (", dim_nope + dim_rope, ", ", dim_v,
                    ") on this device; using the slower composed-ATen core (torch_mla.explain(...) says why "
                    "each fused core declined). This warning is shown once.");
  }
  return core;
}

std::string explain_choice(const CoreQuery& query, const std::string& backend) {
  const CoreChoice choice = choose_core(query, requested_backend(backend));
  std::string text = choice.core + "\n";
  for (const auto& [core, why] : choice.why) text += core + (why ? ": no: " + *why : ": yes") + "\n";
  return text;
}

CoreRegistration::CoreRegistration(const AttentionCore& core) { registry()[core.name] = &core; }

const AttentionCore* find_core(const std::string& name) {
  const auto it = registry().find(name);
  return it == registry().end() ? nullptr : it->second;
}

}  // namespace torch_mla
