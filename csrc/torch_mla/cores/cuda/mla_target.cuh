#pragma once
// The one switch between the two targets of the kernel sources.
//
// nvcc (default): the CUDA headers, and each primitive below as the inline PTX it has always been.
// TORCH_MLA_SIMT defined (host C++, g++/clang): the kernels run on the CPU under the emulator of
// csrc/simt (README.md there): the CUDA keywords, built-in variables, vector and 16-bit float
// types, intrinsics and the c10 macros the kernels use are mapped to it here, and each primitive
// calls its emulated, checked counterpart. Nothing else in the kernel headers depends on the
// target; kernel code differs from plain CUDA only where the host cannot express a construct:
//   TORCH_MLA_DYNAMIC_SMEM(name)  declares the dynamic shared memory (extern __shared__);
//   load_global(p), global_ref(p) = v   plain global loads and stores (checked against the launch's
//                                       tensors); global_ref keeps the evaluation order of *p = v
//                                       (right side first), so the nvcc PTX is that of the plain code;
//   load_shared / store_shared          plain shared loads and stores (checked for races);
//   launch_kernel<kernel>(…)      a launch: on a CUDA stream, or on a simt::Stream.
#include <cstdint>
#include <cstring>

#if defined(TORCH_MLA_SIMT)

#include <cmath>
#include <type_traits>

#include "simt/simt.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define __syncthreads() ::simt::syncthreads()
#define __syncwarp(...) ::simt::syncwarp(__VA_ARGS__)
#define TORCH_MLA_DYNAMIC_SMEM(name) unsigned char* const name = ::simt::dynamic_smem()
// c10/macros/Macros.h and c10/cuda/CUDAException.h (a host translation unit that includes ATen
// first, as cores/simt/simt_core.cpp, has c10's host versions: ours replace them)
#undef CUDA_KERNEL_ASSERT
#undef C10_CUDA_CHECK
#undef C10_CUDA_KERNEL_LAUNCH_CHECK
#define CUDA_KERNEL_ASSERT(cond) ::simt::kernel_assert(static_cast<bool>(cond), #cond)
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

using cudaStream_t = ::simt::Stream*;
using ::simt::dim3;
using ::simt::float2;
using ::simt::make_float2;
using ::simt::uint3;
using ::simt::uint4;
using __nv_bfloat16 = ::simt::bf16;
using __half = ::simt::f16;
using __nv_bfloat162 = ::simt::bf16x2;
using __half2 = ::simt::f16x2;

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {static_cast<float>(v.x), static_cast<float>(v.y)}; }
inline float2 __half22float2(__half2 v) { return {static_cast<float>(v.x), static_cast<float>(v.y)}; }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         ::simt::Loc loc = ::simt::Loc::current()) {
  return ::simt::shfl_xor_sync(mask, v, lane_mask, width, loc);
}
inline float atomicAdd(float* p, float v, ::simt::Loc loc = ::simt::Loc::current()) {
  return ::simt::atomic_add(p, v, loc);
}
inline float2 atomicAdd(float2* p, float2 v, ::simt::Loc loc = ::simt::Loc::current()) {
  return ::simt::atomic_add(p, v, loc);
}
// The shared-memory window's 32-bit address of a generic pointer: its byte offset in the block's
// dynamic shared memory (checked to lie inside it).
inline size_t __cvta_generic_to_shared(const void* p, ::simt::Loc loc = ::simt::Loc::current()) {
  return ::simt::cvta_shared(p, loc);
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

#else  // nvcc

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define TORCH_MLA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

#endif

namespace torch_mla::cuda {

#if defined(TORCH_MLA_SIMT)
// ---- host: the emulator's checked implementations -------------------------------------------
using SimtLoc = ::simt::Loc;

inline uint32_t smem_addr(const void* p, SimtLoc loc = SimtLoc::current()) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p, loc));
}

inline void cp_async_16(uint32_t dst, const void* src, bool valid, SimtLoc loc = SimtLoc::current()) {
  ::simt::cp_async(dst, src, 16, valid ? 16 : 0, loc);
}

inline void cp_async_4(uint32_t dst, const void* src, bool valid, SimtLoc loc = SimtLoc::current()) {
  ::simt::cp_async(dst, src, 4, valid ? 4 : 0, loc);
}

inline void cp_async_commit(SimtLoc loc = SimtLoc::current()) { ::simt::cp_async_commit(loc); }

template <int N>
inline void cp_async_wait(SimtLoc loc = SimtLoc::current()) {
  ::simt::cp_async_wait_group(N, loc);
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, SimtLoc loc = SimtLoc::current()) {
  ::simt::ldmatrix(r, addr, false, loc);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr, SimtLoc loc = SimtLoc::current()) {
  ::simt::ldmatrix(r, addr, true, loc);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                      SimtLoc loc = SimtLoc::current()) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma_16816 takes bf16 or fp16");
  ::simt::mma_m16n8k16(std::is_same_v<T, __nv_bfloat16> ? ::simt::MmaType::bf16 : ::simt::MmaType::f16, d, a, b0,
                       b1, loc);
}

inline void atomic_add_float2(float* dst, float x, float y, SimtLoc loc = SimtLoc::current()) {
  ::simt::atomic_add(reinterpret_cast<float2*>(dst), make_float2(x, y), loc);
}

template <typename T>
inline T load_global(const T* p, SimtLoc loc = SimtLoc::current()) {
  return ::simt::ld_global(p, loc);
}
template <typename T>
inline void store_global(T* p, const T& v, SimtLoc loc = SimtLoc::current()) {
  ::simt::st_global(p, v, loc);
}
// A global element as an assignable reference: global_ref(p) = v stores (checked), reading it loads.
template <typename T>
struct GlobalRef {
  T* p;
  SimtLoc loc;
  GlobalRef& operator=(const T& v) {
    ::simt::st_global(p, v, loc);
    return *this;
  }
  operator T() const { return ::simt::ld_global(p, loc); }
};
template <typename T>
inline GlobalRef<T> global_ref(T* p, SimtLoc loc = SimtLoc::current()) {
  return {p, loc};
}
template <typename T>
inline T load_shared(const T* p, SimtLoc loc = SimtLoc::current()) {
  return ::simt::ld_shared(p, loc);
}
template <typename T>
inline void store_shared(T* p, const T& v, SimtLoc loc = SimtLoc::current()) {
  ::simt::st_shared(p, v, loc);
}

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args…), opting in to smem_bytes of dynamic
// shared memory first.
template <auto kernel, typename... Args>
void launch_kernel(int64_t grid, int block, int smem_bytes, cudaStream_t stream, const Args&... args) {
  if (smem_bytes > 0) ::simt::func_set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
  ::simt::launch<kernel>(stream, dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(block)),
                         static_cast<size_t>(smem_bytes), args...);
}

#else
// ---- nvcc: inline PTX (sm_80+) --------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte copy global→shared that bypasses L1; when !valid it reads nothing and writes zeros, so
// rows past a sequence's end never bring (possibly NaN) memory into the tile.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a · b for one m16n8k16 tile, float accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// dst[0] += x, dst[1] += y in global memory; one vector atomic on sm_90 (dst 8-byte aligned).
__device__ __forceinline__ void atomic_add_float2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

template <typename T>
__device__ __forceinline__ T load_global(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void store_global(T* p, const T& v) {
  *p = v;
}
template <typename T>
__device__ __forceinline__ T& global_ref(T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ T load_shared(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void store_shared(T* p, const T& v) {
  memcpy(p, &v, sizeof(T));
}

template <auto kernel, typename... Args>
void launch_kernel(int64_t grid, int block, int smem_bytes, cudaStream_t stream, const Args&... args) {
  if (smem_bytes > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  kernel<<<static_cast<unsigned>(grid), block, smem_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace torch_mla::cuda
