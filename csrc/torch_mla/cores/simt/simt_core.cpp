// The `simt` core (docs/design.md §10.2): the `cuda` core's CUDA kernels and host code
// (cuda/mla_kernels_host.h), compiled as host C++ under TORCH_MLA_SIMT and run on CPU tensors by
// the SIMT emulator of csrc/simt. For tests only: selectable (torch_mla.use_core("simt"),
// TORCH_MLA_CORE=simt), never picked by `auto`.
//
// Each call registers the logical extent of every tensor the kernels may touch; an access outside
// them, a shared-memory race, a misaligned or unsynchronised collective ends the launch with a
// RuntimeError naming the kernel, block, thread and the check. The emulator's thread order is
// $TORCH_MLA_SIMT_ORDER: forward (default), reverse or random:SEED (csrc/simt/README.md).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/cuda/mla_kernels_host.h"
#include "simt/simt.h"

namespace torch_mla {
namespace {

// Launches on an emulator stream of its own, in the order $TORCH_MLA_SIMT_ORDER asks for.
struct SimtTarget {
  simt::Stream s;

  SimtTarget() {
    const char* env = std::getenv("TORCH_MLA_SIMT_ORDER");
    const std::string order = env != nullptr ? env : "";
    if (order.empty() || order == "forward") {
      s.order = simt::Order::forward;
    } else if (order == "reverse") {
      s.order = simt::Order::reverse;
    } else if (order.rfind("random", 0) == 0) {
      s.order = simt::Order::random;
      s.seed = 1;
      if (order.size() > 6) {
        TORCH_CHECK(order[6] == ':' && order.size() > 7 &&
                        order.find_first_not_of("0123456789", 7) == std::string::npos,
                    "TORCH_MLA_SIMT_ORDER: expected forward, reverse or random:SEED, got '", order, "'");
        s.seed = std::stoull(order.substr(7));
      }
    } else {
      TORCH_CHECK(false, "TORCH_MLA_SIMT_ORDER: expected forward, reverse or random:SEED, got '", order, "'");
    }
  }
  cudaStream_t stream() { return &s; }
  void memory(const at::Tensor& t, const char* name) {
    TORCH_INTERNAL_ASSERT(t.device().is_cpu(), "simt core: ", name, " is not a CPU tensor");
    const size_t bytes = kernels_host::extent_bytes(t);
    if (bytes > 0) s.register_memory(t.data_ptr(), bytes, name);
  }
  template <typename F>
  void run(F&& f) {
    try {
      f();
    } catch (const simt::Error& e) {
      TORCH_CHECK(false, "torch_mla simt core (emulated CUDA kernels): ", e.what());
    }
  }
};

CoreOutputs simt_forward(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                         const at::Tensor& k_rope) {
  SimtTarget target;
  return kernels_host::forward(target, p, q, kv, k_rope);
}

CoreGrads simt_backward(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                        const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                        const at::Tensor& lse) {
  SimtTarget target;
  return kernels_host::backward(target, p, grad_out, q, kv, k_rope, out, lse);
}

const AttentionCore kSimt{"simt", simt_forward, simt_backward};
const CoreRegistration kRegistration(kSimt);

}  // namespace
}  // namespace torch_mla
