// The `cuda` core (docs/design.md §10.2): our mma.sync FlashAttention-2-style CUDA kernels
// (mla_forward.cuh, mla_backward.cuh) on the current CUDA stream. Their host side is
// mla_kernels_host.h, shared with the emulated `simt` core (cores/simt/simt_core.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "torch_mla/cores/core.h"
#include "torch_mla/cores/cuda/mla_kernels_host.h"

namespace torch_mla {
namespace {

// Launches on the current stream; the kernels' memory is not registered anywhere.
struct CudaTarget {
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(); }
  void memory(const at::Tensor&, const char*) {}
  template <typename F>
  void run(F&& f) {
    f();
  }
};

CoreOutputs cuda_forward(const CoreProblem& p, const at::Tensor& q, const at::Tensor& kv,
                            const at::Tensor& k_rope) {
  CudaTarget target;
  return kernels_host::forward(target, p, q, kv, k_rope);
}

CoreGrads cuda_backward(const CoreProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                           const at::Tensor& kv, const at::Tensor& k_rope, const at::Tensor& out,
                           const at::Tensor& lse) {
  CudaTarget target;
  return kernels_host::backward(target, p, grad_out, q, kv, k_rope, out, lse);
}

const AttentionCore kCuda{"cuda", cuda_forward, cuda_backward};
const CoreRegistration kRegistration(kCuda);

}  // namespace
}  // namespace torch_mla
