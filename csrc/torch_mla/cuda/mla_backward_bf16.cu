// Backward kernel instantiations for __nv_bfloat16 (one file per dtype keeps compile units parallel).
#include "torch_mla/cuda/mla_backward.cuh"

namespace torch_mla::cuda {

template void run_mla_backward_preprocess<__nv_bfloat16>(const MlaParams&, int, cudaStream_t);
template void run_mla_backward<__nv_bfloat16, 192, 128>(const MlaParams&, bool, cudaStream_t);
template void run_mla_backward<__nv_bfloat16, 96, 64>(const MlaParams&, bool, cudaStream_t);

}  // namespace torch_mla::cuda
