// Forward kernel instantiations for __half (one file per dtype keeps compile units parallel).
#include "torch_mla/cuda/mla_forward.cuh"

namespace torch_mla::cuda {

template void run_mla_forward<__half, 192, 128>(const MlaParams&, cudaStream_t);
template void run_mla_forward<__half, 96, 64>(const MlaParams&, cudaStream_t);

}  // namespace torch_mla::cuda
