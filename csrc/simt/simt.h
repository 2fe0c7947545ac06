#pragma once
// simt: a small SIMT emulator that runs CUDA kernel source on the CPU (README.md).
//
// A launch runs its CTAs on OS threads (several in parallel), each CTA's threads as fibers on its
// OS thread. Threads run until they reach a synchronisation point (a CTA barrier, a warp barrier or
// a warp collective: shfl, ldmatrix, mma); the scheduler then runs the next thread, in a
// configurable order. The device-side functions below are what the kernels call (through the
// switch header csrc/torch_mla/cores/cuda/mla_target.cuh); each checks its operands and ends the launch
// with simt::Error naming the kernel, block, thread and the check.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "simt/half.h"

namespace simt {

// ---------------------------------------------------------------------------------------------
// CUDA's built-in vector types, as far as the kernels use them.
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// ---------------------------------------------------------------------------------------------
// Host side: launch options and errors.

// Every failed check: message "simt: <check> in kernel <name>, block (x, y, z), thread (x, y, z): …".
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Order in which the scheduler runs the runnable threads of a CTA between synchronisation points,
// re-drawn at every round for `random` (seeded by seed, block and round: reproducible).
enum class Order { forward, reverse, random };
const char* to_string(Order order);

struct MemRange {
  const void* base = nullptr;
  size_t bytes = 0;
  std::string name;
};

struct LaunchStats {
  uint64_t launches = 0;
  uint64_t ctas = 0;
  uint64_t switches = 0;  // fiber resumes
};

// The emulator's stand-in for a CUDA stream (cudaStream_t is Stream* under the switch): launches
// on it run synchronously. Global memory the kernels may touch must be registered: every access
// through the checked primitives outside these ranges fails the launch.
struct Stream {
  std::vector<MemRange> ranges;
  Order order = Order::forward;
  uint64_t seed = 0;
  int workers = 0;  // OS threads running CTAs; 0: $SIMT_WORKERS, else the hardware's cores
  LaunchStats stats;

  void register_memory(const void* base, size_t bytes, std::string name) {
    ranges.push_back({base, bytes, std::move(name)});
  }
};

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
void func_set_max_dynamic_smem(const void* kernel, size_t bytes);

constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90 opt-in maximum per block
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// Runs body() as every thread of every block of the grid; throws Error on the first failed check.
void launch(Stream* stream, std::string_view kernel_name, const void* kernel_id, dim3 grid, dim3 block,
            size_t dynamic_smem, const std::function<void()>& body);

namespace detail {
template <auto F>
const char* pretty_name() {
  return __PRETTY_FUNCTION__;
}
}  // namespace detail

// "ns::kernel<T, …>" of a function given as template argument.
template <auto F>
std::string function_name() {
  std::string s = detail::pretty_name<F>();
  const size_t b = s.find("F = ");
  const size_t e = s.rfind(']');
  if (b == std::string::npos || e == std::string::npos || e <= b + 4) return s;
  return s.substr(b + 4, e - b - 4);
}

template <auto Kernel, typename... Args>
void launch(Stream* stream, dim3 grid, dim3 block, size_t dynamic_smem, const Args&... args) {
  static const std::string name = function_name<Kernel>();
  launch(stream, name, reinterpret_cast<const void*>(Kernel), grid, block, dynamic_smem,
         [&] { Kernel(args...); });
}

// ---------------------------------------------------------------------------------------------
// Device side: called by kernel code running in a fiber of a launch.
using Loc = std::source_location;

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// The CTA's dynamic shared memory (extern __shared__) and the 32-bit shared address of a pointer
// into it (__cvta_generic_to_shared: here the byte offset from its start).
unsigned char* dynamic_smem();
uint32_t cvta_shared(const void* p, Loc loc = Loc::current());

void syncthreads(Loc loc = Loc::current());
void syncwarp(unsigned mask = 0xffffffffu, Loc loc = Loc::current());

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width, Loc loc);
template <typename T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, Loc loc = Loc::current()) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_xor_bits(mask, bits, lane_mask, width, loc);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane i gives the row address of row i % 8 of
// matrix i / 8; r[m] of lane (g = lane/4, t = lane%4) gets elements (g, 2t), (g, 2t+1) of matrix m
// (of its transpose with .trans).
void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans, Loc loc = Loc::current());

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, d = a·b + d, in the fragment
// layouts of the PTX ISA (mla_mma.cuh's header comment).
enum class MmaType { bf16, f16 };
void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                  Loc loc = Loc::current());

// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size: reads src_size bytes now (0: none),
// the destination holds NaN until the copy lands at this thread's cp.async.wait_group.
void cp_async(uint32_t dst, const void* src, int cp_size, int src_size, Loc loc = Loc::current());
void cp_async_commit(Loc loc = Loc::current());
void cp_async_wait_group(int pending, Loc loc = Loc::current());

enum class Access { read, write, atomic };
void check_global(const void* p, size_t bytes, size_t align, Access access, Loc loc);
void check_shared_read(const void* p, size_t bytes, size_t align, Loc loc);
void check_shared_write(const void* p, size_t bytes, size_t align, Loc loc);

template <typename T>
T ld_global(const T* p, Loc loc = Loc::current()) {
  check_global(p, sizeof(T), alignof(T), Access::read, loc);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void st_global(T* p, const T& v, Loc loc = Loc::current()) {
  check_global(p, sizeof(T), alignof(T), Access::write, loc);
  std::memcpy(p, &v, sizeof(T));
}
template <typename T>
T ld_shared(const T* p, Loc loc = Loc::current()) {
  check_shared_read(p, sizeof(T), alignof(T), loc);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void st_shared(T* p, const T& v, Loc loc = Loc::current()) {
  check_shared_write(p, sizeof(T), alignof(T), loc);
  std::memcpy(p, &v, sizeof(T));
}

float atomic_add(float* p, float v, Loc loc = Loc::current());
float2 atomic_add(float2* p, float2 v, Loc loc = Loc::current());

void kernel_assert(bool ok, const char* expr, Loc loc = Loc::current());

// Ends the launch with Error for the current thread (the check names what failed).
[[noreturn]] void fail(std::string_view check, std::string_view detail, Loc loc = Loc::current());

}  // namespace simt
