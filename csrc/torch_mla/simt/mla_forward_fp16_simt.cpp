// The kernel instantiations of cuda/mla_forward_fp16.cu, compiled as host C++ for the emulator
// (TORCH_MLA_SIMT, set for csrc/torch_mla/simt/ only by CMakeLists.txt).
#include "torch_mla/cuda/mla_forward_fp16.cu"
