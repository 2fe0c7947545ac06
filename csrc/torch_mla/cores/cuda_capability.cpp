// The compute capability of a CUDA device, for the core selection (cores/table.h). A plain C++
// file so that builds without nvcc (cuDNN and memory-efficient attention need none) still know the
// device; it needs the CUDA runtime headers, which a CUDA build of torch brings to the include path.
#include "torch_mla/cores/table.h"

#if __has_include(<cuda_runtime_api.h>)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#define TORCH_MLA_HAS_CUDA_RUNTIME 1
#endif

namespace torch_mla {

int cuda_capability(c10::DeviceIndex index) {
#ifdef TORCH_MLA_HAS_CUDA_RUNTIME
  const int device = index < 0 ? c10::cuda::current_device() : index;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major * 10 + minor;
#else
  (void)index;
  return 0;
#endif
}

}  // namespace torch_mla
